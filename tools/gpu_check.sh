#!/usr/bin/env bash
# One-GPU check of dsd against Hugging Face (see tools/gpu_check.py): bash tools/gpu_check.sh [--out DIR] [--smoke] ...
# Runs from the repository root with the active Python (set PYTHON to use another one).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" tools/gpu_check.py "$@"
