#!/usr/bin/env bash
# Everything a short GPU loan should check, in one call that ends within TOTAL_S (default 540 s,
# under a 600 s command limit): offline editable install (builds the CUDA extension), the GPU
# tests, the CUDA kernel tests under compute-sanitizer memcheck, and the benchmark (bf16).
# The tests, the sanitizer and the benchmark run with DISCO_TRUST_UNVERIFIED=1: backend="auto"
# takes the CUDA and Triton kernels although no GPU run has verified them yet (see
# disco_kernels/_verified.py), so that the tests exercise auto's kernel choice and the benchmark's
# "auto" rows time the kernels. The selfcheck stage runs without it and shows what auto takes now.
# After the tests, summary.txt holds the verification records that this run earns (one per
# backend whose GPU tests passed, or why not), to paste into disco_kernels/_verified.py once the
# session's tests.log is committed under bench/results/<device>-<date>/.
#
#   scripts/gpu_session.sh OUT_DIR        # e.g. "$OUT" on a lent machine
#   TOTAL_S=900 TEST_S=300 BENCH_MIN_S=300 scripts/gpu_session.sh OUT_DIR
#
# Each stage has its own time budget (INSTALL_S, SELFCHECK_S, TEST_S, SANITIZER_S), cut to what
# TOTAL_S has left after BENCH_MIN_S for the benchmark, which gets the rest; a failing or cut stage
# does not stop the next. OUT_DIR gets few files (a loan returns at most 8): summary.txt (one line
# per stage), results.csv (the benchmark's rows) and session.tar.gz (every stage's log, the
# sanitizer's report, the benchmark's results and plots), refreshed after every stage. Unpacked,
# they stay in the work folder that summary.txt names.
# The install is editable on purpose: the tests and `python -m bench` import disco_kernels from
# the repository root, where a regular install would be shadowed by the sources, which have
# neither the built _C nor disco_kernels.triton_kernels.
set -uo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
end=$((SECONDS + ${TOTAL_S:-540}))
out=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX")
py=${PYTHON:-python3}  # the GPU images' interpreter; `python` may not exist there
export PYTHON=$py PYTHONUNBUFFERED=1
summary="$work/summary.txt"
echo "work folder: $work" >"$summary"

pack() {  # the summary, the benchmark's rows and a tarball of everything into OUT_DIR
  cp "$summary" "$out/summary.txt"
  local csv
  csv=$(ls -t "$work"/bench/*/results.csv 2>/dev/null | head -n 1)
  [[ -n "$csv" ]] && cp "$csv" "$out/results.csv"
  tar czf "$out/session.tar.gz.tmp" -C "$work" . && mv "$out/session.tar.gz.tmp" "$out/session.tar.gz"
}
trap 'pack; exit 143' TERM

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log, record the exit status
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if ((limit < 10)); then
    echo "$name: not run, no time left" | tee -a "$summary"
    return
  fi
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$summary"
  pack
  return $rc
}

left() {  # left RESERVE: seconds to the end less RESERVE and 20 (the kill grace and packing)
  echo $((end - SECONDS - $1 - 20))
}

budget() {  # budget SECONDS: SECONDS, cut so that the benchmark keeps BENCH_MIN_S
  local l
  l=$(left "${BENCH_MIN_S:-150}")
  echo $(($1 < l ? $1 : l))
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$summary" 2>&1 || true
# --no-index and no version check: a machine without network must not wait on an index.
# Should the CUDA extension fail to build, install without it: the Triton and torch paths still get tested.
install=("$py" -m pip install --no-index --disable-pip-version-check --no-build-isolation --no-deps -e .)
stage install "$(budget "${INSTALL_S:-240}")" env MAX_JOBS="$(nproc)" "${install[@]}" ||
  stage install_without_cuda "$(budget 60)" env DISCO_BUILD_CUDA=0 "${install[@]}"
stage selfcheck "$(budget "${SELFCHECK_S:-60}")" "$py" -m disco_kernels
# the GPU-marked tests only (CI runs the rest on CPU); no -x, so one failure does not hide the others
export DISCO_TRUST_UNVERIFIED=1  # from here on: auto takes unverified kernels (tests, sanitizer, benchmark)
stage tests "$(budget "${TEST_S:-150}")" "$py" -m pytest -q -p no:cacheprovider -m gpu -rf --junitxml="$work/tests.xml" tests
tests_rc=$?
# what this run verifies: a Record per backend whose GPU tests passed, to add to disco_kernels/_verified.py
if [[ -s "$work/tests.xml" ]]; then
  timeout 60 "$py" -c 'import sys; from disco_kernels._verified import main; sys.exit(main())' --junit "$work/tests.xml" --exit "$tests_rc" \
    --command "bash scripts/gpu_session.sh OUT_DIR (tests stage: pytest -m gpu tests)" >"$work/verified.txt" 2>&1 ||
    echo "verification: failed (see above)" >>"$work/verified.txt"
else
  echo "verification: nothing verified (the tests wrote no JUnit report)" >"$work/verified.txt"
fi
cat "$work/verified.txt" >>"$summary"
pack
stage sanitizer "$(budget "${SANITIZER_S:-90}")" env TOOLS=memcheck bash scripts/cuda_sanitizer.sh "$work/sanitizer"
# the rest of the time; no case starts in the last 30 s, and SIGINT at the limit still writes results and plots
bench_s=$(left 0)
stage bench "$bench_s" "$py" -m bench --out "$work/bench/{device}-{date}" --time-limit "$((bench_s - 30))" \
  --suites step,newton_schulz,fused_update,power_iteration --dtypes bf16
cat "$summary"
tr '\r' '\n' <"$work/bench.log" 2>/dev/null | tail -n 40  # the benchmark's table (tqdm redraws with \r)
