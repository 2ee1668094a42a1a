#!/usr/bin/env bash
# The benchmark's command on one TPU host, inside the image (xpk.sh and gce.sh start it on every
# host of every slice):
#   python clm/run_clm.py +experiment=$EXPERIMENT output_dir=$OUTPUT_DIR OVERRIDES...
# with the reference README's environment. Afterwards, when RESULTS_URI is set (gs://bucket/path,
# or any fsspec URL or local path), the output directory is copied to RESULTS_URI/<hostname>/,
# because a GKE pod's disk is gone when the workload ends. Exits with run_clm's status.
#   EXPERIMENT  gbs256_tpu (default), another preset in clm/config/experiment/, or none
#   OUTPUT_DIR  /app/output (an output_dir=... override wins, as in Hydra)
#   NUM_SLICES  slices of a multi-slice job: passed as num_slices=N (an override wins)
#   PYTHON      python
set -uo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." || exit 2

# the reference README's environment; each can be overridden from outside. WANDB_MODE=offline
# applies once wandb.enabled=true is among the overrides: process 0 then writes an offline W&B
# run into the run directory, which the copy to RESULTS_URI carries (docs/WANDB.md)
export HF_HOME=${HF_HOME:-/tmp}
export HYDRA_FULL_ERROR=${HYDRA_FULL_ERROR:-1}
export WANDB_MODE=${WANDB_MODE:-offline}
export PJRT_DEVICE=${PJRT_DEVICE:-TPU}
export XLA_USE_SPMD=${XLA_USE_SPMD:-1}
export XLA_IR_DEBUG=${XLA_IR_DEBUG:-1}
export XLA_HLO_DEBUG=${XLA_HLO_DEBUG:-1}

PYTHON=${PYTHON:-python}
EXPERIMENT=${EXPERIMENT:-gbs256_tpu}
output_dir=${OUTPUT_DIR:-/app/output}

args=(clm/run_clm.py)
[[ "$EXPERIMENT" != none ]] && args+=("+experiment=$EXPERIMENT")
[[ -n "${NUM_SLICES:-}" ]] && args+=("num_slices=$NUM_SLICES")
args+=("output_dir=$output_dir" "$@")
for arg in "$@"; do
  [[ "$arg" == output_dir=* ]] && output_dir=${arg#output_dir=}
done

host=${HOSTNAME:-$(hostname)}
echo "[$host] $PYTHON ${args[*]}"
"$PYTHON" "${args[@]}"
status=$?
echo "[$host] run_clm.py exited with $status"

if [[ -n "${RESULTS_URI:-}" && -d "$output_dir" ]] && [[ -n "$(ls -A "$output_dir")" ]]; then
  dest="${RESULTS_URI%/}/$host"
  if "$PYTHON" - "$output_dir" "$dest" <<'PY'; then
import sys

import fsspec

src, dest = sys.argv[1], sys.argv[2]
fs, root = fsspec.core.url_to_fs(dest)
fs.put(src.rstrip("/") + "/", root, recursive=True)
PY
    echo "[$host] copied $output_dir to $dest"
  else
    echo "[$host] error: copying $output_dir to $dest failed" >&2
    ((status == 0)) && status=1
  fi
fi
exit "$status"
