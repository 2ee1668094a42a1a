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

# usage: the script's leading comment block (its help), without the shebang or any code
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# preflight SLICE NUM_SLICES OVERRIDES...: ask the capacity planner (python -m clm.plan) whether
# the run fits before renting the slice's time, and set PLANNED to the overrides the run needs on
# that slice: gradient_accumulation_steps=N when the planner derives it (a preset that fixes the
# global batch, on fewer devices than the batch has rows). It stops when the planner cannot run
# (no interpreter here imports clm), says the run does not fit, or rejects the configuration;
# FORCE=1 submits anyway in the first two cases (without PLANNED when the planner did not run).
PLANNED=()
preflight() {
  local py=${PYTHON:-} slice=$1 slices=$2 rc=0 accumulation
  shift 2
  if [[ -z "$py" ]]; then  # the venv `make venv` builds, else whatever python3 is
    py=python3
    [[ -x "$REPO_ROOT/.venv/bin/python" ]] && py=$REPO_ROOT/.venv/bin/python
  fi
  local args=()
  [[ "${EXPERIMENT:-gbs256_tpu}" != none ]] && args=("+experiment=${EXPERIMENT:-gbs256_tpu}")
  args+=("$@" "slice=$slice" "num_slices=$slices")
  if ! (cd "$REPO_ROOT" && "$py" -c 'import clm.plan' 2>/dev/null); then
    [[ "${FORCE:-0}" == 1 ]] \
      || die "cannot run the capacity check: $py cannot import clm (make venv, or set PYTHON to an interpreter that can); FORCE=1 submits without it"
    echo "warning: FORCE=1: submitting without the capacity check" >&2
    return 0
  fi
  (cd "$REPO_ROOT" && "$py" -m clm.plan "${args[@]}") || rc=$?
  if ((rc == 1)) && [[ "${FORCE:-0}" != 1 ]]; then
    die "the capacity planner says this run does not fit $slice (report above); FORCE=1 submits anyway"
  fi
  ((rc <= 1)) || die "the capacity planner rejected the configuration (message above)"
  accumulation=$(cd "$REPO_ROOT" && "$py" -c '
import sys
from clm.plan import plan
p = plan(sys.argv[1:])
print(p.accumulation if p.accumulation_derived else "")' "${args[@]}") \
    || die "could not read the planner's gradient accumulation (message above)"
  if [[ -n "$accumulation" ]]; then
    # shellcheck disable=SC2034  # read by xpk.sh and gce.sh
    PLANNED=("gradient_accumulation_steps=$accumulation")
    echo "note: adding gradient_accumulation_steps=$accumulation, what $slice needs for the global batch (clm.plan)" >&2
  fi
}
