"""README.md and examples/ stay true: every Python block of the README and every example script
runs against the tests' ComfyUI server; the README's shell commands name commands and options
that exist.

README blocks run in order in one namespace (a block may use what an earlier one made), from the
repository root, with ComfyUI's default address ``http://127.0.0.1:8188`` replaced by the test
server's. A block whose first line is ``# not run: <why>`` is skipped, and the skip says why.
Example scripts run as users run them, each in a process of its own, given the server by
``COMFYUI_URL``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
EXAMPLES = sorted((REPO / "examples").glob("*.py"))
DEFAULT_URL = "http://127.0.0.1:8188"
NOT_RUN = "# not run:"
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """(info string, code, line number) of each fenced block."""
    return [(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1) for m in _FENCE.finditer(text)]


def _blocks(kind: tuple[str, ...]) -> list[tuple[str, int]]:
    return [(code, line) for info, code, line in code_blocks(README.read_text()) if info.split(" ")[:1] and
            info.split(" ")[0] in kind]


PY_BLOCKS = _blocks(("python", "py"))
SH_BLOCKS = _blocks(("sh", "bash", "shell", "console"))


def test_the_readme_has_blocks_to_run():
    assert len(PY_BLOCKS) >= 5 and SH_BLOCKS
    assert any("DiscomfortPort" in code or "run_sequential" in code for code, _ in PY_BLOCKS)


@pytest.fixture(scope="module")
def namespace() -> dict[str, Any]:
    return {"__name__": "__readme__"}


@pytest.mark.comfy
@pytest.mark.parametrize("index", range(len(PY_BLOCKS)), ids=[f"README.md:{line}" for _, line in PY_BLOCKS])
def test_readme_python_block(index, request, namespace, monkeypatch):
    code, line = PY_BLOCKS[index]
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    if first.startswith(NOT_RUN):
        pytest.skip(f"README.md line {line}: {first[len(NOT_RUN):].strip()}")
    server = request.getfixturevalue("server")
    monkeypatch.chdir(REPO)
    source = code.replace(DEFAULT_URL, server.url)
    exec(compile(source, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code


@pytest.mark.comfy
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_script(script, server, tmp_path):
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COMFYUI_URL": server.url})
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.strip(), f"{script.name} printed nothing"


def test_every_example_is_listed_in_its_readme():
    listed = (REPO / "examples" / "README.md").read_text()
    assert EXAMPLES and all(f"`{p.name}`" in listed for p in EXAMPLES)
    for wf in (REPO / "examples" / "workflows").glob("*.json"):
        assert f"`{wf.name}`" in listed, wf.name


def test_relative_links_lead_to_files():
    """Every relative link of README.md, examples/README.md and docs/*.md names a file that exists."""
    pages = [README, REPO / "examples" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    dead = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#", 1)[0]
            if path and "://" not in path and not (page.parent / path).exists():
                dead.append(f"{page.relative_to(REPO)} -> {target}")
    assert not dead, dead


def _discomfort_commands() -> list[list[str]]:
    """Each ``discomfort ...`` command line of the README's shell blocks, as words."""
    found = []
    for code, _line in SH_BLOCKS:
        text = code.replace("\\\n", " ")
        for raw in text.splitlines():
            for part in re.split(r"&&|\|\||;", raw.split(" #", 1)[0]):
                words = shlex.split(part)
                if words and words[0].endswith("discomfort") and len(words) > 1:
                    found.append(words[1:])
    return found


def test_readme_shell_commands_exist():
    """`discomfort COMMAND --option` in the README: the command exists and takes the option."""
    pytest.importorskip("torch")
    from discomfort.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = _discomfort_commands()
    assert {"demo", "bench"} <= {words[0] for words in commands}
    for words in commands:
        assert words[0] in sub.choices, f"README: `discomfort {words[0]}` is no command"
        options = set(sub.choices[words[0]]._option_string_actions)
        for word in words[1:]:
            if word.startswith("--"):
                assert word.split("=", 1)[0] in options, f"README: `discomfort {words[0]}` has no {word}"
