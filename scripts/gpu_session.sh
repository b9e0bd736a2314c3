#!/usr/bin/env bash
# Everything a short GPU loan should check, in one call that fits ten minutes:
# offline install (builds the CUDA extension), the GPU tests, the
# CUDA kernel tests under compute-sanitizer memcheck, and the benchmark.
#
#   scripts/gpu_session.sh OUT_DIR        # e.g. "$OUT" on a lent machine
#   TEST_S=200 SANITIZER_S=60 BENCH_S=200 scripts/gpu_session.sh OUT_DIR
#
# Each stage has its own time budget and log (OUT_DIR/<stage>.log); a failing or
# cut stage does not stop the next. OUT_DIR/summary.txt has one line per stage;
# the benchmark's results land in OUT_DIR/bench/<device>-<date>/ (copy them to
# bench/results/ and commit).
set -uo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
summary="$out/summary.txt"
: >"$summary"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log, record the exit status
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$summary"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$summary" 2>&1 || true
stage install "${INSTALL_S:-240}" env MAX_JOBS="$(nproc)" python -m pip install --no-build-isolation --no-deps -e .
stage selfcheck 60 python -m disco_kernels
# the GPU-marked tests only (CI runs the rest on CPU); no -x, so one failure does not hide the others
stage tests "${TEST_S:-150}" python -m pytest -q -p no:cacheprovider -m gpu -rf tests
stage sanitizer "${SANITIZER_S:-90}" env TOOLS=memcheck scripts/cuda_sanitizer.sh "$out/sanitizer"
stage bench "${BENCH_S:-180}" python -m bench --out "$out/bench/{device}-{date}" --time-limit "$(( ${BENCH_S:-180} - 40 ))" \
  --suites step,newton_schulz,fused_update,power_iteration
