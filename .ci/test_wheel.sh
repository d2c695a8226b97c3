#!/usr/bin/env bash
# Installs a built wheel into a fresh virtual environment and runs the README's test command
# against the installed package (not the source tree: the package lives under python/, which
# is never on sys.path here).
#   .ci/test_wheel.sh WHEEL
set -euo pipefail
wheel=${1:?usage: test_wheel.sh WHEEL}
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q -r requirements-test.txt
python -m pip install -q --no-deps "$wheel"
python - <<'PY'
import fused_adamw, fused_adamw._ext as ext
assert "site-packages" in fused_adamw.__file__, fused_adamw.__file__
assert ext.C is not None, ext.REASON
print("testing", fused_adamw.__file__, ext.build_info())
PY
python -m fused_adamw
# The README's test command:
TRITON_INTERPRET=1 python -m pytest -q tests
