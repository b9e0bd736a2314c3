#!/usr/bin/env bash
# Mutation score of the math and the plan (issue 12), with mutmut; writes tests/mutation/score.txt.
#
#   scripts/mutation.sh                 # fresh run over the whole scope (~20 min on 2 busy cores, see score.txt)
#   scripts/mutation.sh 'disco_kernels.lmo.x*'   # rerun some mutants (globs), keep the rest, rewrite the report
#
# Not run in CI: it runs the fast CPU tests once per mutant (~2000 mutants).
# Environment:
#   MUTATION_VENV   virtual environment to use or create (default .venv-mutation in the repo root)
#   MUTATION_JOBS   mutants tested at once (default 2)
#   TORCH_SPEC      what to pip-install for torch when the venv is created (default "torch"; use a CPU wheel
#                   index or a pin such as torch==2.13.0 to avoid the multi-GB CUDA build)
# The scope (which functions count) is in scripts/mutation_scope.py; the triage of survivors that no test can
# kill is in tests/mutation/equivalent.txt.
set -euo pipefail -f   # -f: the mutant globs are for mutmut, not for the shell

cd "$(dirname "$0")/.."
VENV="${MUTATION_VENV:-.venv-mutation}"
JOBS="${MUTATION_JOBS:-2}"

if [ ! -x "$VENV/bin/mutmut" ]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "${TORCH_SPEC:-torch}"
    DISCO_BUILD_CUDA=0 "$VENV/bin/pip" install -q -e ".[test,mutation]"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# The editable install's import hook comes after sys.path, so the tests import mutmut's mutants/ copy; mutmut's
# own "forced fail" run (every mutated function raises) stops the run if they imported the original instead.
start=$(date +%s)
if [ "$#" -eq 0 ]; then
    echo "== fresh run: removing mutants/"
    rm -rf mutants
    set -- $(python scripts/mutation_scope.py patterns)
fi
echo "== mutmut $(python -c 'import importlib.metadata as m; print(m.version("mutmut"))'), $JOBS workers, $# mutant patterns"
# progress: mutmut's spinner line (done/total, then killed, no tests, timeout, suspicious, survived, ...), thinned out
mutmut run --max-children "$JOBS" "$@" 2>&1 | tr '\r' '\n' | awk '
    /^(🎉|🙁|⏰|🤔|🫥|🔇|🧙) / { next }                                    # the per-mutant list: see score.txt
    /[0-9]+\/[0-9]+  🎉/ { if (++n % 300 == 0) { print; fflush() } next }
    /^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏]/ { next }
    NF { print; fflush() }'
minutes=$(python -c "print(($(date +%s) - $start) / 60)")
python scripts/mutation_scope.py report tests/mutation/score.txt "$minutes"
echo "== tests/mutation/score.txt written ($(printf '%.0f' "$minutes") min)"
