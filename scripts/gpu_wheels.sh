#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh needs beyond the device image (its package list: /work/.library/device/
# KINDS.md, or `pip list` there): diffutron's data path (datasets, ftfy, datasketch) for the FSDP part.
# Run here, in the repository root, before the device call; .whl/ is ignored by git and carried by the call.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 ftfy==6.3.1 wcwidth==0.9.5 datasketch==2.0.0
du -sh .whl
