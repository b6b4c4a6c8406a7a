#!/usr/bin/env bash
# Rebuild the two shipped tiny models (src/diffutron/assets/models/) with diffutron's own commands.
# Seeds are fixed in the recipes; wall time on 2 CPU cores: see the model cards. --force: export
# replaces a folder that holds no earlier export marker only when told to (the shipped folders predate it).
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DIFFUTRON:-.venv/bin/diffutron}
rm -rf runs/tiny-base-mlm runs/tiny-diffutron-cpt
$D train configs/tiny-base-mlm.yaml
$D export runs/tiny-base-mlm --out src/diffutron/assets/models/tiny-base --force
$D train configs/tiny-diffutron-cpt.yaml
$D export runs/tiny-diffutron-cpt --out src/diffutron/assets/models/tiny-diffutron --merge-lora --force
