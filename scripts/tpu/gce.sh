#!/usr/bin/env bash
# The benchmark on Cloud TPU VMs (GCE): every worker runs the image with docker, over
# `gcloud compute tpus tpu-vm ssh --worker=all` (or `queued-resources ssh --node=all
# --worker=all` for a multi-slice queued resource).
#
#   scripts/tpu/gce.sh create                 # the TPU VM (NUM_SLICES > 1: a queued resource)
#   scripts/tpu/gce.sh pull                   # docker login to IMAGE's registry + pull, all workers
#   scripts/tpu/gce.sh run [OVERRIDES...]     # capacity check, then docker run -d on all workers
#   scripts/tpu/gce.sh logs | metrics         # follow worker 0's container log / metrics.jsonl
#   scripts/tpu/gce.sh fetch [DEST]           # copy worker 0's output directory here (./results)
#   scripts/tpu/gce.sh stop | delete          # remove the containers / delete the TPU
#
# Settings (environment):
#   TPU_NAME     TPU VM name, or the queued resource's name when NUM_SLICES > 1     (required)
#   ZONE         e.g. us-east5-a                                                     (required)
#   TPU_TYPE     slice type, e.g. v5p-512 (v5e: v5litepod-N)                  (create, run)
#   NUM_SLICES   slices (default 1); > 1 uses a queued resource whose nodes are $TPU_NAME-0..
#   IMAGE        the image docker/tpu/build_and_push_image.sh pushed            (pull, run)
#   PROJECT_ID   passed to gcloud when set (else gcloud's default project)
#   RUNTIME_VERSION  TPU VM software (default: v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite
#                for v5e, v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4)
#   HOST_OUTPUT  directory on each VM mounted as the container's /app/output
#                (default /var/tmp/mlperf-moe)
#   RESULTS_URI  optional gs://bucket/path: each worker also copies its output there
#   EXPERIMENT   preset for +experiment= (default gbs256_tpu; none: no preset)
#   DOCKER_RUN_ARGS  extra `docker run` flags, e.g. "-v /mnt/ckpt:/ckpt:ro"
#   GCLOUD_ARGS  extra flags for the create command, e.g. "--spot" or "--reserved"
#   PYTHON, FORCE=1  as in xpk.sh: the interpreter for the capacity check; submit anyway
# `run` adds the gradient_accumulation_steps the planner derives, as xpk.sh does.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

CONTAINER=mlperf-moe
NUM_SLICES=${NUM_SLICES:-1}
HOST_OUTPUT=${HOST_OUTPUT:-/var/tmp/mlperf-moe}
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES=$NUM_SLICES: must be a positive integer"

case "${1:-}" in
  "" | -h | --help | help)
    usage
    [[ -n "${1:-}" ]] || die "missing subcommand: use create, pull, run, logs, metrics, fetch, stop or delete"
    exit 0
    ;;
esac

require TPU_NAME "the TPU VM's name (or the queued resource's when NUM_SLICES > 1)"
require ZONE "the TPU's zone, e.g. us-east5-a"
command -v gcloud >/dev/null || die "gcloud is not installed (Google Cloud CLI)"
LOCATION=(--zone "$ZONE")
[[ -n "${PROJECT_ID:-}" ]] && LOCATION+=(--project "$PROJECT_ID")

# ssh_all COMMAND: run COMMAND on every worker of every slice
ssh_all() {
  if ((NUM_SLICES > 1)); then
    gcloud compute tpus queued-resources ssh "$TPU_NAME" "${LOCATION[@]}" --node=all --worker=all \
      --command "$1"
  else
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all --command "$1"
  fi
}

# the VM of slice 0 (worker 0 runs the main process: metrics.jsonl, the MLPerf log)
main_node() {
  if ((NUM_SLICES > 1)); then echo "$TPU_NAME-0"; else echo "$TPU_NAME"; fi
}

ssh_main() {
  gcloud compute tpus tpu-vm ssh "$(main_node)" "${LOCATION[@]}" --worker=0 --command "$1"
}

default_runtime() {
  case "$1" in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

case "$1" in
  create)
    require TPU_TYPE "the slice type, e.g. v5p-512"
    runtime=${RUNTIME_VERSION:-$(default_runtime "$TPU_TYPE")}
    read -ra extra <<<"${GCLOUD_ARGS:-}"
    if ((NUM_SLICES > 1)); then
      gcloud compute tpus queued-resources create "$TPU_NAME" "${LOCATION[@]}" \
        --accelerator-type "$TPU_TYPE" --runtime-version "$runtime" \
        --node-count "$NUM_SLICES" --node-prefix "$TPU_NAME" "${extra[@]}"
    else
      gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
        --accelerator-type "$TPU_TYPE" --version "$runtime" "${extra[@]}"
    fi
    ;;
  pull)
    require IMAGE "the training image (docker/tpu/build_and_push_image.sh prints it)"
    registry=${IMAGE%%/*}
    login=""  # a registry host (has a dot): let docker use gcloud's credentials for it
    [[ "$IMAGE" == */* && "$registry" == *.* ]] \
      && login="sudo gcloud auth configure-docker $(quote_args "$registry") --quiet && "
    ssh_all "${login}sudo docker pull $(quote_args "$IMAGE")"
    ;;
  run)
    shift
    require TPU_TYPE "the slice type, e.g. v5p-512 (for the capacity check)"
    require IMAGE "the training image (docker/tpu/build_and_push_image.sh prints it)"
    preflight "$TPU_TYPE" "$NUM_SLICES" "$@"
    read -ra docker_args <<<"${DOCKER_RUN_ARGS:-}"
    # detached: the run outlives the ssh session; `logs` follows it
    ssh_all "set -e
if [ -n \"\$(sudo docker ps -q --filter name=^/$CONTAINER\\\$)\" ]; then
  echo \"error: \$(hostname): container $CONTAINER is still running (scripts/tpu/gce.sh stop)\" >&2
  exit 1
fi
sudo docker rm -f $CONTAINER >/dev/null 2>&1 || true
sudo mkdir -p $(quote_args "$HOST_OUTPUT")
sudo docker run -d --name $CONTAINER --privileged --net host --shm-size=16G -v /tmp:/tmp \
  -v $(quote_args "$HOST_OUTPUT:$APP_DIR/output") $(quote_args "${docker_args[@]}") \
  $(quote_args "$IMAGE") bash -c $(quote_args "$(workload_command "$@" "${PLANNED[@]}")")"
    echo "started $CONTAINER on every worker of $TPU_NAME; follow it with: scripts/tpu/gce.sh logs"
    ;;
  logs)
    ssh_main "sudo docker logs -f $CONTAINER"
    ;;
  metrics)
    ssh_main "tail -n 20 -f $(quote_args "$HOST_OUTPUT")/*/metrics.jsonl"
    ;;
  fetch)
    dest=${2:-results}
    mkdir -p "$dest"
    gcloud compute tpus tpu-vm scp --recurse "$(main_node):$HOST_OUTPUT" "$dest" \
      "${LOCATION[@]}" --worker=0
    find "$dest" -name mlperf_compliance.log | while read -r log; do
      echo "check it with: make check-log LOG=$log DIVISION=closed"
    done
    ;;
  stop)
    ssh_all "sudo docker rm -f $CONTAINER"
    ;;
  delete)
    if ((NUM_SLICES > 1)); then
      gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force --quiet
    else
      gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
    fi
    ;;
  *)
    usage >&2
    die "unknown subcommand '$1': use create, pull, run, logs, metrics, fetch, stop or delete"
    ;;
esac
