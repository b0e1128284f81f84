#!/usr/bin/env bash
# The main job of the README (`make demo` runs this): creates .venv if needed, installs
# backprop with matplotlib, trains an MLP on the UCI handwritten digits, and writes the
# checkpoint, the history (JSON and CSV) and a PNG of the learning curves to runs/digits.
set -euo pipefail
cd "$(dirname "$0")/.."
source ci/venv.sh plot
exec "$VENV/bin/python" -m backprop train --data digits --hidden 128,64 --activation relu \
  --optimizer adam --lr 1e-3 --epochs 30 --batch-size 64 --seed 0 --device auto \
  --out runs/digits "$@"
