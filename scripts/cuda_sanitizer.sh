#!/usr/bin/env bash
# Run tests/test_cuda_kernels.py under compute-sanitizer (GPU machine, disco_kernels._C built).
#
#   scripts/cuda_sanitizer.sh LOG_DIR [extra pytest args]
#   TOOLS="memcheck racecheck synccheck initcheck" scripts/cuda_sanitizer.sh LOG_DIR
#
# One run per tool (default: memcheck, racecheck), each instrumenting only this package's
# kernels; LOG_DIR/<tool>.log holds the sanitizer report and the pytest output, and
# LOG_DIR/summary.txt the machine, the versions and one line per tool. memcheck runs
# without torch's caching allocator, so every tensor is its own allocation and an access
# past a tensor's end is reported. The >2^31-element tests are left out (-k "not huge").
# Exit status: 0 when every tool ran clean and every test passed, else 1.
set -uo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 LOG_DIR [extra pytest args]" >&2
  exit 2
fi
log_dir=$1
shift
cd "$(dirname "$0")/.."
mkdir -p "$log_dir"
log_dir=$(cd "$log_dir" && pwd)
py=${PYTHON:-python3}  # the GPU images' interpreter; `python` may not exist there

sanitizer=$(command -v compute-sanitizer || true)
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  [[ -z "$sanitizer" && -n "$home" && -x "$home/bin/compute-sanitizer" ]] && sanitizer="$home/bin/compute-sanitizer"
done
if [[ -z "$sanitizer" ]]; then
  echo "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)" >&2
  exit 2
fi
"$py" - <<'EOF' || exit 2
import sys, torch
from disco_kernels import _backend
if not torch.cuda.is_available() or _backend.cuda_extension() is None:
    sys.exit("needs a CUDA device and a built disco_kernels._C")
EOF

kernels='fused_update_kernel|pass_kernel|finish_kernel|newton_schulz_small_kernel'
summary="$log_dir/summary.txt"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  "$sanitizer" --version | tail -n 1 | sed 's/^/sanitizer: /'
  "$py" -c "import torch, disco_kernels._C as C; print('torch:', torch.__version__, '| _C archs:', C.cuda_archs)"
} > "$summary"

status=0
for tool in ${TOOLS:-memcheck racecheck}; do
  env=()
  [[ $tool == memcheck ]] && env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  echo "== $tool -> $log_dir/$tool.log"
  env "${env[@]}" "$sanitizer" --tool "$tool" --error-exitcode 1 --kernel-regex "kns=$kernels" \
    "$py" -m pytest tests/test_cuda_kernels.py -q -p no:cacheprovider -k "not huge" "$@" > "$log_dir/$tool.log" 2>&1
  rc=$?
  result=$(grep -E "(ERROR|RACECHECK) SUMMARY" "$log_dir/$tool.log" | tail -n 1)
  tests=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|errors?)" "$log_dir/$tool.log" | tail -n 1)
  echo "$tool: exit $rc | ${result:-no sanitizer summary} | ${tests:-no pytest summary}" | tee -a "$summary"
  [[ $rc -eq 0 ]] || status=1
done
exit $status
