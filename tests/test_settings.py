"""The settings table (discomfort._settings): the only place the package reads its environment,
in step with the docs, every parser refusing bad text by the variable's name, and
``discomfort doctor --settings`` showing the values in force."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from discomfort import _settings
from discomfort._settings import SETTINGS

SPEC = importlib.util.find_spec("discomfort")
assert SPEC is not None and SPEC.submodule_search_locations
PACKAGE = Path(list(SPEC.submodule_search_locations)[0])
REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NAME = re.compile(r"\b(?:DISCOMFORT_[A-Z0-9_]*[A-Z0-9]|RAY_ADDRESS)\b")


# ---- (a) no environment read outside the table ------------------------------------------------

def environment_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for each use of the process environment: ``os.environ`` (read, copy or write),
    ``os.getenv`` / ``os.putenv`` / ``os.environb``, and those names imported from ``os``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv", "putenv",
                                                               "unsetenv")
                and isinstance(node.value, ast.Name) and node.value.id in ("os", "posix", "nt")):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "posix", "nt"):
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                      if a.name in ("environ", "environb", "getenv", "putenv", "unsetenv")]
    return found


def test_the_scan_finds_every_kind_of_read():
    source = ("import os\nfrom os import getenv\na = os.environ.get('X')\nb = os.environ['X']\n"
              "c = 'X' in os.environ\nd = os.getenv('X')\ne = dict(os.environ)\n")
    assert sorted(line for line, _ in environment_uses(source)) == [2, 3, 4, 5, 6, 7]
    assert environment_uses("import os\nos.path.join('a', 'b')\nenviron = {}\n") == []
    assert environment_uses((PACKAGE / "_settings.py").read_text())  # the table's own reads are seen


def test_no_environment_read_outside_the_settings_table():
    """Every setting is read through discomfort._settings (get, raw, is_set; child_env for a child
    process's environment), so the table is the whole answer to "what can I configure?"."""
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "_core.pyi"]
    assert len(files) > 50
    bad = [f"{p.relative_to(PACKAGE.parent)}:{line}: {what}" for p in files if p != PACKAGE / "_settings.py"
           for line, what in environment_uses(p.read_text())]
    assert not bad, "read the environment through discomfort._settings:\n" + "\n".join(bad)


# ---- (b) the table and the docs in step ---------------------------------------------------------

def test_the_table_is_well_formed():
    assert set(_settings.SCOPES) == {s.scope for s in SETTINGS.values()}
    for name, s in SETTINGS.items():
        assert s.name == name and NAME.fullmatch(name), name
        assert s.doc and "\n" not in s.doc, name
        if s.default is not None and s.kind not in ("text", "names"):
            # the default is a value the parser gives: written as the variable would be, it reads back
            assert s.value({name: _settings._shown(s, s.default)}) == s.default, name


def test_every_setting_users_may_set_is_documented():
    """A setting of the package (not a test's) appears in README.md or docs/*.md besides the
    generated docs/SETTINGS.md: the page that explains it."""
    text = "\n".join(p.read_text() for p in DOCS if p.name != "SETTINGS.md")
    missing = [n for n, s in SETTINGS.items() if s.scope != "test" and n not in set(NAME.findall(text))]
    assert not missing, f"settings in no document (README.md, docs/*.md): {missing}"


def test_every_variable_the_docs_name_is_in_the_table():
    named = {(p.name, n) for p in DOCS for n in NAME.findall(p.read_text())}
    unknown = sorted((f, n) for f, n in named if n not in SETTINGS)
    assert not unknown, f"the docs name variables discomfort._settings does not have: {unknown}"


def test_settings_page_is_the_table():
    page = REPO / "docs" / "SETTINGS.md"
    assert page.read_text() == _settings.markdown(), (
        "docs/SETTINGS.md differs from the table: regenerate it with the command at its top")
    assert "SETTINGS.md" in (REPO / "docs" / "PLATFORMS.md").read_text()


def test_variables_the_suite_and_scripts_read_are_in_the_table():
    """Tests, scripts, benchmarks and the C++ core read their own switches and hooks: listed too
    (scope "test"), so one table names every variable of the project."""
    var = r"""\s*["']?(DISCOMFORT_[A-Z0-9_]*[A-Z0-9])\b"""
    read = re.compile(r"(?:environ\.get\(|environ\[|getenv\(|\$\{|\$)" + var)  # Python, C++, shell
    cmake = re.compile(r"\$ENV\{" + var)  # ${NAME} is CMake's own variable there
    files = [p for d in ("tests", "scripts", "benchmarks", "cpp", ".ci") if (REPO / d).is_dir()
             for p in sorted((REPO / d).rglob("*")) if p.suffix in (".py", ".sh", ".cpp", ".hpp", "")
             and p.is_file() and "__pycache__" not in p.parts]
    seen = {(p.relative_to(REPO).as_posix(), n) for p in files for n in read.findall(p.read_text(errors="replace"))}
    seen |= {("CMakeLists.txt", n) for n in cmake.findall((REPO / "CMakeLists.txt").read_text())}
    assert ("CMakeLists.txt", "DISCOMFORT_REQUIRE_NATIVE") in seen
    assert any(n == "DISCOMFORT_TEST_KILLPOINT" for _, n in seen)  # the C++ core's hook is among them
    unknown = sorted((f, n) for f, n in seen if n not in SETTINGS)
    assert not unknown, f"variables read outside the package but missing from the table: {unknown}"


# ---- (c) parsers: values, and bad text refused by the variable's name ---------------------------

CHECKED = sorted(n for n, s in SETTINGS.items() if s.kind not in ("text", "names"))  # those may be any text


@pytest.mark.parametrize("name", CHECKED)
def test_bad_text_is_refused_naming_the_variable(name):
    s = SETTINGS[name]
    with pytest.raises(ValueError) as info:
        s.value({name: "lots of"})
    message = str(info.value)
    assert message.startswith(f"{name}='lots of' ") and ("use" in message), message


def test_values_parse_and_unset_or_empty_means_the_default():
    value = _settings.SETTINGS
    assert value["DISCOMFORT_RAM_BUDGET"].value({"DISCOMFORT_RAM_BUDGET": "8G"}) == 8 << 30
    assert value["DISCOMFORT_RAM_BUDGET"].value({"DISCOMFORT_RAM_BUDGET": ""}) is None
    assert value["DISCOMFORT_BACKEND"].value({"DISCOMFORT_BACKEND": " Python "}) == "python"
    assert value["DISCOMFORT_REQUIRE_NATIVE"].value({"DISCOMFORT_REQUIRE_NATIVE": "yes"}) is True
    assert value["DISCOMFORT_REQUIRE_NATIVE"].value({"DISCOMFORT_REQUIRE_NATIVE": "0"}) is False
    assert value["DISCOMFORT_REMOTE_STALL"].value({"DISCOMFORT_REMOTE_STALL": "2.5"}) == 2.5
    assert value["DISCOMFORT_ALLOWED_HOSTS"].value({"DISCOMFORT_ALLOWED_HOSTS": " a.test, ,b.test "}) \
        == ("a.test", "b.test")
    for bad in ("-1", "1.5", "nan"):
        with pytest.raises(ValueError, match="DISCOMFORT_REMOTE_MAX_RUNS="):
            value["DISCOMFORT_REMOTE_MAX_RUNS"].value({"DISCOMFORT_REMOTE_MAX_RUNS": bad})
    with pytest.raises(ValueError, match="DISCOMFORT_REMOTE_RUN_TTL='inf'"):
        value["DISCOMFORT_REMOTE_RUN_TTL"].value({"DISCOMFORT_REMOTE_RUN_TTL": "inf"})
    with pytest.raises(KeyError, match="DISCOMFORT_NO_SUCH is not a setting"):
        _settings.get("DISCOMFORT_NO_SUCH")


def test_a_secret_is_never_shown():
    secret = "s3cret-value-of-twenty"
    env = {"DISCOMFORT_SERVER_SECRET": secret}
    line = next(x for x in _settings.report(environ=env) if x.startswith("DISCOMFORT_SERVER_SECRET "))
    assert secret not in line and "(hidden)" in line and line.endswith("environment")


def test_settings_read_where_they_are_used(monkeypatch):
    """The reads go through the table: a value set now is seen now, a bad one names its variable."""
    from discomfort import sysinfo

    monkeypatch.setenv("DISCOMFORT_RAM_BUDGET", "3M")
    assert sysinfo.ram_budget() == 3 << 20
    monkeypatch.setenv("DISCOMFORT_RAM_BUDGET", "lots")
    with pytest.raises(ValueError, match="DISCOMFORT_RAM_BUDGET='lots' is not a size"):
        sysinfo.ram_budget()
    with pytest.raises(ValueError, match="not a size: 'lots'"):  # the public parser keeps its message
        sysinfo.parse_size("lots")


def test_server_and_panel_limits_take_their_defaults_from_the_table(monkeypatch):
    try:
        from discomfort.panel.io import PanelLimits
        from discomfort.remote.limits import ServerLimits
    except ImportError as exc:  # pragma: no cover - a trimmed install
        pytest.skip(f"needs the server modules: {exc}")
    import dataclasses

    for cls in (ServerLimits, PanelLimits):
        fields = [f for f in dataclasses.fields(cls) if "setting" in f.metadata]
        assert len(fields) >= 9
        plain = cls()
        for f in fields:
            assert getattr(plain, f.name) == SETTINGS[f.metadata["setting"]].default, f.name
    monkeypatch.setenv("DISCOMFORT_REMOTE_MAX_RUN_BYTES", "1M")
    monkeypatch.setenv("DISCOMFORT_REMOTE_MAX_VALUE", "64K")
    monkeypatch.setenv("DISCOMFORT_PANEL_CANCEL_GRACE", "2.5")
    monkeypatch.setenv("DISCOMFORT_PANEL_HISTORY_BYTES", "2M")
    server, panel = ServerLimits.from_env(), PanelLimits.from_env()
    assert (server.max_run_bytes, server.max_value, server.codec.max_bytes) == (1 << 20, 64 << 10, 64 << 10)
    assert server.max_runs == SETTINGS["DISCOMFORT_REMOTE_MAX_RUNS"].default
    assert (panel.cancel_grace, panel.history_bytes) == (2.5, 2 << 20)
    monkeypatch.setenv("DISCOMFORT_PANEL_MAX_ITERATIONS", "1e3")
    with pytest.raises(ValueError, match="DISCOMFORT_PANEL_MAX_ITERATIONS='1e3' is not valid"):
        PanelLimits.from_env()


def test_child_env_copies_without_touching_this_process(monkeypatch):
    monkeypatch.setenv("SETTINGS_TEST_CHILD_A", "a")
    env = _settings.child_env(drop=("SETTINGS_TEST_CHILD_A",), SETTINGS_TEST_CHILD_B="b")
    assert "SETTINGS_TEST_CHILD_A" not in env and env["SETTINGS_TEST_CHILD_B"] == "b"
    assert os.environ["SETTINGS_TEST_CHILD_A"] == "a" and "SETTINGS_TEST_CHILD_B" not in os.environ
    assert _settings.child_env({"X": "1"}, Y="2") == {"X": "1", "Y": "2"}


# ---- doctor --settings ----------------------------------------------------------------------------

def _discomfort(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DISCOMFORT_")
            or k in ("DISCOMFORT_REQUIRE_NATIVE", "DISCOMFORT_BACKEND")}
    prog = "import sys\nfrom discomfort.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", prog, *args], capture_output=True, text=True,
                          env={**base, **env}, timeout=120)


def test_doctor_settings_prints_each_value_and_where_it_came_from():
    proc = _discomfort("doctor", "--settings", DISCOMFORT_REMOTE_MAX_RUNS="7", DISCOMFORT_TRANSPORT="HTTP")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines()}
    assert set(lines) == set(SETTINGS)
    assert lines["DISCOMFORT_REMOTE_MAX_RUNS"][1:] == ["7", "environment"]
    assert lines["DISCOMFORT_TRANSPORT"][1:] == ["http", "environment"]
    assert lines["DISCOMFORT_REMOTE_MAX_VALUE"][1:] == ["8G", "default"]
    assert lines["DISCOMFORT_RAM_BUDGET"][1:] == ["-", "default"]


def test_doctor_settings_names_a_value_that_is_not_valid():
    proc = _discomfort("doctor", "--settings", DISCOMFORT_PANEL_MAX_RUNS="many")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("discomfort doctor: DISCOMFORT_PANEL_MAX_RUNS='many' is not valid; "
                                   "use a whole number, 0 or more")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("DISCOMFORT_PANEL_MAX_RUNS "))
    assert "(not valid)" in line


def test_plain_doctor_checks_every_setting(tmp_path):
    """doctor without --settings also refuses a setting a run or the panel would fail on."""
    proc = _discomfort("doctor", "--disk-dir", str(tmp_path), DISCOMFORT_PANEL_MAX_RUNS="many")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "DISCOMFORT_PANEL_MAX_RUNS='many' is not valid; use a whole number, 0 or more" in proc.stderr


def test_debug_switch_that_is_not_valid_is_one_line():
    proc = _discomfort("doctor", "--settings", DISCOMFORT_DEBUG="maybe")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "discomfort doctor: error: DISCOMFORT_DEBUG='maybe' is not valid; use one of: 1, true, yes, on (on) "
        "or 0, false, no, off (off)"]
