# Sourced by ci/test.sh, demo.sh and bench.sh: create .venv (or $VENV) from $PYTHON if it is
# missing and install backprop editable with the extras in $1 (e.g. "test" or "plot").
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[$1]"
