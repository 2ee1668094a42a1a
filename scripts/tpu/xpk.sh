#!/usr/bin/env bash
# The benchmark on a GKE TPU cluster through xpk: one script for the cluster, the run, its logs.
#
#   scripts/tpu/xpk.sh cluster                    # xpk cluster create (once)
#   scripts/tpu/xpk.sh run [OVERRIDES...]         # capacity check, then xpk workload create
#   scripts/tpu/xpk.sh status | logs | delete     # xpk workload list / kubectl logs -f / delete
#
# Settings (environment):
#   CLUSTER      GKE cluster name                                    (required)
#   TPU_TYPE     slice type, e.g. v5p-512 (v5e: v5litepod-N)        (required)
#   NUM_SLICES   slices joined over the data-center network          (default 1)
#   IMAGE        the image docker/tpu/build_and_push_image.sh pushed (run)
#   RESULTS_URI  gs://bucket/path: each host copies its output directory there when the run
#                ends, since a pod's disk is gone with the pod      (run)
#   WORKLOAD     workload name                                       (default $USER-mlperf-moe)
#   PROJECT_ID, ZONE   passed to xpk when set (else gcloud's defaults)
#   EXPERIMENT   preset for +experiment= (default gbs256_tpu; none: no preset)
#   XPK_ARGS     extra xpk flags, e.g. "--reservation=<name>" or "--spot" for cluster,
#                "--priority=high" for run
#   PYTHON       interpreter that can import clm, for the capacity check (default: .venv/bin/python
#                when it exists, else python3); the run is refused when it cannot run
#   FORCE=1      submit even when the capacity planner says it does not fit, or cannot run
# `run` adds the gradient_accumulation_steps the planner derives for TPU_TYPE x NUM_SLICES (a
# preset that fixes the global batch, e.g. 2 on v5p-256) unless the overrides set it.
# OVERRIDES are Hydra overrides for run_clm.py, e.g. gradient_accumulation_steps=4
# checkpoint_manager_path=/ckpt/mixtral822 dataset.train_dataset_path=gs://...
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=lib.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"

NUM_SLICES=${NUM_SLICES:-1}
WORKLOAD=${WORKLOAD:-${USER:-$(id -un)}-mlperf-moe}
read -ra EXTRA <<<"${XPK_ARGS:-}"
LOCATION=()
[[ -n "${PROJECT_ID:-}" ]] && LOCATION+=(--project "$PROJECT_ID")
[[ -n "${ZONE:-}" ]] && LOCATION+=(--zone "$ZONE")

need_cluster() {
  require CLUSTER "the GKE cluster's name (scripts/tpu/xpk.sh cluster creates it)"
  command -v xpk >/dev/null || die "xpk is not installed: pip install xpk"
}

case "${1:-}" in
  cluster)
    need_cluster
    require TPU_TYPE "the slice type, e.g. v5p-512"
    xpk cluster create --cluster "$CLUSTER" --tpu-type "$TPU_TYPE" --num-slices "$NUM_SLICES" \
      "${LOCATION[@]}" "${EXTRA[@]}"
    ;;
  run)
    shift
    need_cluster
    require TPU_TYPE "the slice type, e.g. v5p-512"
    require IMAGE "the training image (docker/tpu/build_and_push_image.sh prints it)"
    require RESULTS_URI "gs://<bucket>/<path> where each host copies its run directory"
    preflight "$TPU_TYPE" "$NUM_SLICES" "$@"
    # --docker-image runs the image as built; --base-docker-image would copy this directory over it
    xpk workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --docker-image "$IMAGE" \
      --tpu-type "$TPU_TYPE" --num-slices "$NUM_SLICES" "${LOCATION[@]}" "${EXTRA[@]}" \
      --command "$(workload_command "$@" "${PLANNED[@]}")"
    echo "submitted $WORKLOAD; follow it with: scripts/tpu/xpk.sh logs"
    ;;
  status)
    need_cluster
    xpk workload list --cluster "$CLUSTER" "${LOCATION[@]}"
    ;;
  logs)
    command -v kubectl >/dev/null || die "kubectl is not installed"
    # slice 0, worker 0: the process that writes metrics.jsonl and the MLPerf log
    selector="jobset.sigs.k8s.io/jobset-name=$WORKLOAD,jobset.sigs.k8s.io/job-index=0"
    selector+=",batch.kubernetes.io/job-completion-index=0"
    pod=$(kubectl get pods -l "$selector" -o name | awk 'NR == 1')  # no SIGPIPE under pipefail
    [[ -n "$pod" ]] || die "no pod of workload $WORKLOAD yet (scripts/tpu/xpk.sh status)"
    kubectl logs -f "$pod"
    ;;
  delete)
    need_cluster
    xpk workload delete --cluster "$CLUSTER" --workload "$WORKLOAD" "${LOCATION[@]}"
    ;;
  -h | --help | help)
    usage
    ;;
  *)
    usage >&2
    die "unknown or missing subcommand '${1:-}': use cluster, run, status, logs or delete"
    ;;
esac
