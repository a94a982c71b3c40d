#!/usr/bin/env bash
# Test the dependency floors: pyproject's `name>=X` installed as exactly `name==X` (torch and
# torchvision at their pins, everything they do not name at pip's newest fit) in a venv of its own,
# then the unit tests there. Run as `make test-floors` or `bash .ci/floors.sh [pytest args]`.
#   FLOORS_VENV   the venv (default .venv-floors, gitignored); kept between runs, FLOORS_FRESH=1 rebuilds
#   PYTHON        the interpreter the venv is made from (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FLOORS_VENV:-.venv-floors}
PYTHON=${PYTHON:-python3}
started=$SECONDS

[[ ${FLOORS_FRESH:-0} == 1 ]] && rm -rf "$VENV"
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }

# the direct dependencies and the test extra, each pinned to its floor (constraints take no extras)
"$VENV/bin/python" - >"$VENV/floors.txt" <<'EOF'
import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
    found = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)", spec)
    if found:
        print(f"{found[1]}=={found[2]}")
EOF

"$VENV/bin/python" -m pip install --quiet -c "$VENV/floors.txt" -e ".[test]" 2>&1 |
    { grep -v "is ignored: it is neither a file nor a directory" || true; }
# constraints make pip choose exactly these; say so, and fail if a floor was not what got installed
"$VENV/bin/python" - "$VENV/floors.txt" <<'EOF'
import sys
from importlib.metadata import version

from pip._vendor.packaging.version import Version

bad = []
for line in open(sys.argv[1]):
    name, floor = line.strip().split("==")
    got = version(name)
    print(f"  {name:28} {got}")
    if Version(got) != Version(floor):
        bad.append(f"{name}: installed {got}, floor {floor}")
sys.exit("\n".join(bad) or None)
EOF
"$VENV/bin/python" -c "import visiontune.components, visiontune.pipelines, torch, timm, mlflow, prefect"
echo "floors installed in $((SECONDS - started)) s ($("$VENV/bin/python" --version))"

# the unit and component tests of every library with a floor: no end-to-end runs (slow), no GPU,
# no server fixture (MLflow tracking server, PostgreSQL, S3: `server`); what runs in-process or on
# loopback does run: MLflow's embedded store, `visiontune serve`, Prefect's test harness
if (($#)); then
    tests=("$@")
else
    tests=(-m "not slow and not gpu and not server" -p no:cacheprovider
        tests/test_config.py tests/test_images.py tests/test_cache.py tests/test_splits.py
        tests/test_prepare.py tests/test_duplicates.py tests/test_validate.py tests/test_audit.py
        tests/test_model.py tests/test_methods.py tests/test_train.py tests/test_resume.py
        tests/test_evaluate.py tests/test_export.py tests/test_predict.py tests/test_tracking.py
        tests/test_caching.py tests/test_cli.py tests/test_serve.py tests/test_flow.py
        tests/test_deployments.py)
fi
"$VENV/bin/python" -m pytest "${tests[@]}"
echo "floors checked in $((SECONDS - started)) s"
