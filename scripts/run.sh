#!/usr/bin/env bash
# One entry point for the two README commands:
#   bash scripts/run.sh demo   set up .venv, then generate the synthetic data set, train baseline + FAM briefly
#                              on CPU, evaluate both defect sets and print the comparison table
#   bash scripts/run.sh test   set up .venv, then run the whole test suite
# Set-up keeps an installed torch: if the python used here can already import torch (e.g. a user's CUDA
# build), the virtualenv sees it through --system-site-packages and pip leaves it alone; otherwise the
# CPU wheel torch==2.13.0 is installed. A bare "pip install torch" is never run (it pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        if "$PY" -c "import torch" >/dev/null 2>&1; then
            echo "setup: keeping the torch that $PY already has ($("$PY" -c 'import torch; print(torch.__version__)'))"
            "$PY" -m venv --system-site-packages "$VENV"
        else
            "$PY" -m venv "$VENV"
        fi
    fi
    local vpy="$VENV/bin/python"
    if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
        echo "setup: installing torch==2.13.0 (CPU build)"
        "$vpy" -m pip install -q torch==2.13.0
    fi
    # Reinstall the package only when pyproject.toml changed since the last set-up.
    local stamp="$VENV/.skullrec-setup" want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "setup: installing skullrec and its dependencies into $VENV"
        "$vpy" -m pip install -q --disable-pip-version-check -e ".[dev]"  # every extra + the test tools
        echo "$want" >"$stamp"
    fi
}

case "${1:-}" in
    demo)
        setup
        shift
        "$VENV/bin/skullrec" experiment --config configs/demo.yaml "$@"
        ;;
    test)
        setup
        shift
        "$VENV/bin/python" -m pytest "$@"
        ;;
    setup)
        setup
        # The command lives in the virtualenv, not on PATH: say how to reach it.
        echo "setup: done; run $VENV/bin/skullrec, or 'source $VENV/bin/activate' to put skullrec on PATH"
        ;;
    *)
        echo "usage: bash scripts/run.sh demo|test|setup [extra args]" >&2
        exit 2
        ;;
esac
