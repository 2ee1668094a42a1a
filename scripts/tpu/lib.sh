# shellcheck shell=bash
# Shared by xpk.sh and gce.sh (sourced): required settings, quoting, the capacity preflight and
# the one command line every TPU host runs.

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
# where the image keeps the checkout (docker/tpu/Dockerfile: WORKDIR /app)
APP_DIR=/app

die() {
  echo "error: $*" >&2
  exit 2
}

# require NAME HINT: stop with one line naming the variable when it is unset or empty
require() {
  [[ -n "${!1:-}" ]] || die "$1 is not set: $2"
}

# quote_args ARGS...: one string that a remote bash splits back into exactly ARGS
quote_args() {
  local out="" arg
  for arg in "$@"; do
    out+=" $(printf '%q' "$arg")"
  done
  printf '%s' "${out# }"
}

# workload_command OVERRIDES...: what runs in the container on every host (scripts/tpu/workload.sh
# runs `python clm/run_clm.py +experiment=$EXPERIMENT output_dir=... OVERRIDES...`, with
# num_slices=$NUM_SLICES when NUM_SLICES > 1, so the XLA mesh spans the slices)
workload_command() {
  local env_vars=(EXPERIMENT="${EXPERIMENT:-gbs256_tpu}")
  [[ -n "${RESULTS_URI:-}" ]] && env_vars+=(RESULTS_URI="$RESULTS_URI")
  ((${NUM_SLICES:-1} > 1)) && env_vars+=(NUM_SLICES="$NUM_SLICES")
  printf 'cd %s && %s bash scripts/tpu/workload.sh %s' \
    "$APP_DIR" "$(quote_args "${env_vars[@]}")" "$(quote_args "$@")"
}

# preflight SLICE NUM_SLICES OVERRIDES...: ask the capacity planner (python -m clm.plan) whether
# the run fits before renting the slice's time. Skipped when clm is not importable here; a "does
# not fit" stops unless FORCE=1; a configuration error always stops.
preflight() {
  local py=${PYTHON:-python3} slice=$1 slices=$2 rc=0
  shift 2
  if ! (cd "$REPO_ROOT" && "$py" -c 'import clm.plan' 2>/dev/null); then
    echo "note: skipping the capacity check: $py cannot import clm here (set PYTHON=.venv/bin/python)" >&2
    return 0
  fi
  local experiment=()
  [[ "${EXPERIMENT:-gbs256_tpu}" != none ]] && experiment=("+experiment=${EXPERIMENT:-gbs256_tpu}")
  (cd "$REPO_ROOT" && "$py" -m clm.plan "${experiment[@]}" "$@" "slice=$slice" "num_slices=$slices") || rc=$?
  if ((rc == 1)) && [[ "${FORCE:-0}" != 1 ]]; then
    die "the capacity planner says this run does not fit $slice (report above); FORCE=1 submits anyway"
  fi
  ((rc <= 1)) || die "the capacity planner rejected the configuration (message above)"
}
