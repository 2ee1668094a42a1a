#!/usr/bin/env bash
# Build the TPU training image from this checkout and push it, as the reference README does:
#   bash docker/tpu/build_and_push_image.sh       # -> gcr.io/${PROJECT_ID}/${USER}-pytorch-xla-moe-${DATE}
#   IMAGE=<registry>/<name>:<tag> bash docker/tpu/build_and_push_image.sh
# PROJECT_ID defaults to gcloud's configured project. PUSH=0 builds without pushing.
# DOCKER_BUILD_ARGS adds flags to `docker build` (e.g. "--platform linux/amd64 --no-cache").
# The image is labelled with the checkout's commit (org.opencontainers.image.revision).
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
DATE=$(date +%Y%m%d)

if [[ -z "${IMAGE:-}" ]]; then
  if [[ -z "${PROJECT_ID:-}" ]] && command -v gcloud >/dev/null; then
    PROJECT_ID=$(gcloud config get-value project 2>/dev/null || true)
  fi
  [[ -n "${PROJECT_ID:-}" ]] \
    || die "set IMAGE=<registry>/<name>:<tag>, or PROJECT_ID (or run: gcloud config set project <id>)"
  IMAGE="gcr.io/${PROJECT_ID}/${USER:-$(id -un)}-pytorch-xla-moe-${DATE}"
fi
command -v docker >/dev/null || die "docker is not installed (or not on PATH)"

REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]]; then
  echo "warning: the checkout has uncommitted changes; they go into the image" >&2
  REVISION="${REVISION}-dirty"
fi

read -ra EXTRA <<<"${DOCKER_BUILD_ARGS:-}"
DOCKER_BUILDKIT=1 docker build \
  --file "$ROOT/docker/tpu/Dockerfile" \
  --build-arg "REVISION=$REVISION" \
  --tag "$IMAGE" \
  "${EXTRA[@]}" \
  "$ROOT"
if [[ "${PUSH:-1}" != 0 ]]; then
  docker push "$IMAGE"
fi
echo "image: $IMAGE"
