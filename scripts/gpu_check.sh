#!/usr/bin/env bash
# The GPU check in one call (scripts/gpu_check.py says what it measures): on a fresh GPU machine with the
# device image (python3 with torch + CUDA, transformers, accelerate, peft; no network), from the repository
# root. What the image lacks travels as wheels in .whl/ (scripts/gpu_wheels.sh fetches them here).
#   bash scripts/gpu_check.sh [--out FILE]     # at most 8 minutes on one H100
#   bash scripts/gpu_check.sh --cpu            # tiny sizes on the CPU: the test suite runs this
# PYTHON: the interpreter (default python3, the image's; the test suite passes its own).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
case " $* " in
  *" --cpu "*) ;;  # the dry run uses the environment it is given
  *) if compgen -G ".whl/*.whl" >/dev/null; then
       "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
         --target /tmp/gpu-check-site .whl/*.whl || exit 1
       export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
     fi ;;
esac
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec timeout 480 "$PYTHON" scripts/gpu_check.py "$@"
