#!/usr/bin/env bash
# The full benchmark on a GPU machine, no network needed: real model shapes, every
# backend, fp32 and bf16, the baselines that are installed. Results and plots go
# to bench/results/<device>-<date>/ (to commit); pass --out DIR to write elsewhere
# (e.g. --out "$OUT/{device}-{date}"), and any other `python -m bench` flag.
#
#   scripts/gpu_bench.sh                     # whole suite, cases started within 480 s
#   BENCH_TIME_LIMIT=900 scripts/gpu_bench.sh --suites step,newton_schulz
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-python3}  # the GPU images' interpreter; `python` may not exist there
# "auto" rows time the kernels auto takes once verified, verified yet or not (disco_kernels/_verified.py);
# DISCO_TRUST_UNVERIFIED=0 times what auto takes today. (The self-check below shows the verified state.)
export DISCO_TRUST_UNVERIFIED=${DISCO_TRUST_UNVERIFIED:-1}

# Editable, so that the package imported from this folder is the built one (with _C and
# disco_kernels.triton_kernels); offline, builds the CUDA extension when nvcc is found.
if ! "$py" -c "import disco_kernels.triton_kernels" 2>/dev/null; then
    "$py" -m pip install --no-index --disable-pip-version-check --no-build-isolation --no-deps -e . >/dev/null
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
"$py" -m disco_kernels || echo "self-check FAILED: timing anyway" >&2  # versions, backends, self-check
# The headline first: a run cut by the time limit keeps the whole-step numbers.
exec "$py" -m bench --out "bench/results/{device}-{date}" --time-limit "${BENCH_TIME_LIMIT:-480}" \
    --suites step,newton_schulz,fused_update,power_iteration "$@"
