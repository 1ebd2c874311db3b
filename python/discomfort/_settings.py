"""Every setting, once: its environment variable, parser, default, scope and one line of doc.

This module is the only place the package reads its environment (``tests/test_settings.py``
fails on a read anywhere else). A value is read when asked (:func:`get`), never frozen here: a
module that reads a setting once at import says so in its doc line. An unset or empty variable
means the default; a value its parser refuses is a ValueError naming the variable and what is
valid. ``discomfort doctor --settings`` prints the table with the values in force;
``docs/SETTINGS.md`` is :func:`markdown`, kept equal to it by the tests.

Scopes: "user" (the store, runs, the command line), "server" (the HTTP run routes of a ComfyUI
server), "panel" (the editor panel's runner), "ray" (Ray runs), "test" (hooks and switches of the
test suite, the scripts and the C++ core's own tests: not for users).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

__all__ = ["Setting", "SETTINGS", "SCOPES", "TRANSPORTS", "BACKENDS", "get", "raw", "is_set", "default",
           "setting_field", "from_settings", "child_env", "parse_size", "report", "problems", "markdown"]

BACKENDS = ("auto", "native", "python")
TRANSPORTS = ("auto", "shm", "http")
SCOPES = ("user", "server", "panel", "ray", "test")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_size(text: str) -> int:
    """'512M', '2GiB', '1048576' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use bytes or a K/M/G/T suffix)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


# ---- parsers: raw text -> value, or ValueError("is not ...; use ...") -----------------------------

def _text(raw: str) -> str:
    return raw


def _word(raw: str) -> str:
    return raw.strip()


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ValueError(f"is not valid; use one of: {', '.join(_TRUE)} (on) or {', '.join(_FALSE)} (off)")


def _count(raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError("is not valid; use a whole number, 0 or more")
    return value


def _seconds(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ValueError("is not valid; use a number of seconds, 0 or more (e.g. 30 or 2.5)")
    return value


def _size(raw: str) -> int:
    try:
        return parse_size(raw)
    except ValueError:
        raise ValueError("is not a size; use bytes or a K/M/G/T suffix (e.g. 8G)") from None


def _names(raw: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in raw.split(",") if n.strip())


def _choice(*valid: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in valid:
            raise ValueError(f"is not valid; use one of: {', '.join(valid)}")
        return value

    parse.__name__ = "|".join(valid)
    return parse


_KINDS: dict[Callable[[str], Any], str] = {
    _text: "text", _word: "text", _flag: "flag", _count: "count", _seconds: "seconds", _size: "size", _names: "names"}


@dataclass(frozen=True)
class Setting:
    """One environment variable: ``parse`` turns its text into the value; unset or empty: ``default``."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    scope: str
    doc: str
    secret: bool = False  # never printed

    @property
    def kind(self) -> str:
        return _KINDS.get(self.parse, self.parse.__name__)

    def raw(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The variable's text, None when unset or empty."""
        return (os.environ if environ is None else environ).get(self.name) or None

    def value(self, environ: Mapping[str, str] | None = None) -> Any:
        raw = self.raw(environ)
        if raw is None:
            return self.default
        try:
            return self.parse(raw)
        except ValueError as exc:
            shown = "(hidden)" if self.secret else repr(raw)
            raise ValueError(f"{self.name}={shown} {exc}") from None


def _table(*rows: Setting) -> dict[str, Setting]:
    return {s.name: s for s in rows}


S = Setting
_MIB, _GIB = 1 << 20, 1 << 30
SETTINGS: dict[str, Setting] = _table(
    # ---- user: the store, runs, the command line
    S("DISCOMFORT_BACKEND", _choice(*BACKENDS), "auto", "user",
      "the store implementation (auto: the C++ core when it loads, else pure Python); read at import"),
    S("DISCOMFORT_REQUIRE_NATIVE", _flag, False, "user",
      "1: importing discomfort (and building it from source) fails instead of falling back to pure Python"),
    S("DISCOMFORT_RAM_BUDGET", _size, None, "user",
      "RAM tier of a run (e.g. 8G); default: half of MemAvailable, bounded by /dev/shm and the cgroup"),
    S("DISCOMFORT_DISK_DIR", _text, None, "user",
      "root of the disk tier; default: $TMPDIR/discomfort-$UID (mode 0700)"),
    S("DISCOMFORT_TRANSPORT", _choice(*TRANSPORTS), "auto", "user",
      "how values reach a ComfyUI server's nodes when a run does not say"),
    S("DISCOMFORT_COMFYUI", _text, None, "user",
      "the ComfyUI folder a run (or `discomfort run`) loads in this process when given no executor"),
    S("DISCOMFORT_COMFY_NODES", _text, None, "user",
      "the node pack folder given to ComfyUI processes discomfort starts; default: the installed copy"),
    S("DISCOMFORT_CACHE", _text, None, "user",
      "where `discomfort demo` and scripts/setup_comfyui.py fetch ComfyUI to; default: ~/.cache/discomfort"),
    S("DISCOMFORT_DEBUG", _flag, False, "user",
      "1: the command line shows the whole traceback of an error, not one line"),
    # ---- server: the HTTP run routes (remote/server.py, remote/limits.py)
    S("DISCOMFORT_SERVER_SECRET", _text, None, "server",
      "the secret (16+ characters) HTTP clients send to create runs; read by server and client", secret=True),
    S("DISCOMFORT_ALLOWED_HOSTS", _names, (), "server",
      "comma-separated host names a server answers besides IP literals and localhost"),
    S("DISCOMFORT_ALLOWED_ORIGINS", _names, (), "server",
      "comma-separated browser origins allowed besides the server's own"),
    S("DISCOMFORT_REMOTE_MAX_RUNS", _count, 32, "server", "HTTP runs alive at once"),
    S("DISCOMFORT_REMOTE_MAX_RUNS_PER_CLIENT", _count, 8, "server", "HTTP runs alive at once per client address"),
    S("DISCOMFORT_REMOTE_MAX_BUDGET", _size, 0, "server",
      "largest RAM budget an HTTP run may ask; 0: this machine's default RAM budget"),
    S("DISCOMFORT_REMOTE_MAX_VALUE", _size, 8 * _GIB, "server", "bytes of one value (one frame)"),
    S("DISCOMFORT_REMOTE_MAX_RUN_BYTES", _size, 16 * _GIB, "server",
      "bytes one HTTP run holds, both tiers, stored and arriving"),
    S("DISCOMFORT_REMOTE_MAX_CLIENT_BYTES", _size, 32 * _GIB, "server",
      "bytes all runs of one client address hold, stored and arriving"),
    S("DISCOMFORT_REMOTE_MAX_UPLOADS_PER_RUN", _count, 4, "server", "values arriving at once in one run (429 over it)"),
    S("DISCOMFORT_REMOTE_MAX_UPLOADS_PER_CLIENT", _count, 8, "server",
      "values arriving at once from one client address (429 over it)"),
    S("DISCOMFORT_REMOTE_MAX_DOWNLOADS_PER_CLIENT", _count, 4, "server",
      "values being sent at once to one client address (429 over it)"),
    S("DISCOMFORT_REMOTE_RUN_TTL", _seconds, 900.0, "server", "seconds an HTTP run nobody uses lives"),
    S("DISCOMFORT_REMOTE_STALL", _seconds, 60.0, "server", "seconds a request body may send nothing (408)"),
    S("DISCOMFORT_REMOTE_MIN_RATE", _size, 64 << 10, "server",
      "bytes/s a body must average after the grace period (408 under it); 0: none"),
    S("DISCOMFORT_REMOTE_RATE_GRACE", _seconds, 30.0, "server", "seconds before the minimum rate counts"),
    # ---- panel: the editor panel's runner (panel/)
    S("DISCOMFORT_PANEL_URL", _text, None, "panel",
      "the URL the panel's runs reach their own ComfyUI server at; default: its listen address and port"),
    S("DISCOMFORT_PANEL_MAX_WORKFLOWS", _count, 16, "panel", "workflows in one panel run"),
    S("DISCOMFORT_PANEL_MAX_ITERATIONS", _count, 1000, "panel", "iterations of one panel run"),
    S("DISCOMFORT_PANEL_MAX_RUNS", _count, 4, "panel", "panel runs going at once, all clients together"),
    S("DISCOMFORT_PANEL_MAX_RUNS_PER_ADDRESS", _count, 2, "panel", "panel runs going at once from one client address"),
    S("DISCOMFORT_PANEL_CANCEL_GRACE", _seconds, 30.0, "panel", "seconds a cancelled run may hold its slot"),
    S("DISCOMFORT_PANEL_MAX_INPUT_FILE", _size, 256 * _MIB, "panel", "bytes of one input file"),
    S("DISCOMFORT_PANEL_MAX_RUN_INPUT_BYTES", _size, 1 * _GIB, "panel", "decoded inputs of one run, in bytes"),
    S("DISCOMFORT_PANEL_HISTORY_FILES", _count, 256, "panel", "per-iteration output files one run keeps"),
    S("DISCOMFORT_PANEL_HISTORY_BYTES", _size, 256 * _MIB, "panel",
      "bytes of per-iteration output files one run keeps"),
    # ---- ray
    S("DISCOMFORT_RAY_LOAD", _choice("view", "copy"), "view", "ray",
      "what RayContext.load returns: read-only views of Ray's object store, or private copies"),
    S("RAY_ADDRESS", _text, None, "ray",
      "Ray's own: the cluster a process joins when given no address; the pool sets it for its servers"),
    S("DISCOMFORT_RAY_NODE_IP", _text, None, "ray",
      "set by the server pool for the ComfyUI servers it starts: the node address they join Ray with"),
    # ---- test: hooks of the package and the C++ core, switches of the test suite and scripts
    S("DISCOMFORT_TEST_PLATFORM", _word, None, "test",
      "simulate another system (darwin, win32) on Linux; read once at import"),
    S("DISCOMFORT_TEST_KILLPOINT", _word, None, "test",
      "park the process at this named point so a test can kill it there (both backends; read once)"),
    S("DISCOMFORT_TEST_KILLPOINT_FD", _count, None, "test",
      "file descriptor the parked process writes one byte to (both backends)"),
    S("DISCOMFORT_TEST_FAIL_NEXT_WRITE", _word, None, "test",
      "ENOSPC|ENOMEM[#tag]: fail the next reservation of space once (both backends)"),
    S("DISCOMFORT_SIM_OWN", _text, None, "test",
      "tests/_simplatform: more folders (os.pathsep) whose code the simulated system's limits apply to"),
    S("DISCOMFORT_SIM_LOG", _text, None, "test", "tests/_simplatform: the file the simulation logs what it refused to"),
    S("DISCOMFORT_TEMPLATES", _text, None, "test", "the workflow templates package the ComfyUI tests load"),
    S("DISCOMFORT_WHEEL", _text, None, "test", "the wheel the packaging tests install"),
    S("DISCOMFORT_FRONTEND_NEWEST", _text, None, "test",
      "the newest ComfyUI frontend the conversion tests compare with"),
    S("DISCOMFORT_ARTIFACTS", _text, "/tmp/discomfort-artifacts", "test", "where the browser tests leave screenshots"),
    S("DISCOMFORT_SKIP_BROWSER", _flag, False, "test", "1: skip the browser tests"),
    S("DISCOMFORT_CHROMIUM", _text, "/usr/bin/chromium", "test", "the browser the browser tests drive"),
    S("DISCOMFORT_FUZZ_CASES", _count, None, "test", "cases of the fuzz tests"),
    S("DISCOMFORT_STRESS_OPS", _count, 600, "test", "operations of the stress test"),
    S("DISCOMFORT_PROBE_LOG", _text, None, "test", "where the test node pack logs what it saw"),
    S("DISCOMFORT_BENCH_SIZES", _text, "1MiB,12MiB,192MiB", "test", "value sizes of the store benchmarks"),
    S("DISCOMFORT_PY310", _text, None, "test", "scripts/test.sh: the Python 3.10 its second pass runs on"),
    S("DISCOMFORT_PY313", _text, None, "test", "scripts/test.sh: the Python 3.13 its third pass runs on"),
    S("DISCOMFORT_VENV", _text, None, "test", "scripts/test.sh: the virtual environment it uses; default .venv"),
)
del S


def _setting(name: str) -> Setting:
    try:
        return SETTINGS[name]
    except KeyError:
        raise KeyError(f"{name} is not a setting: add it to discomfort._settings.SETTINGS") from None


def get(name: str) -> Any:
    """The value of setting ``name`` in force now (ValueError naming it when its text is not valid)."""
    return _setting(name).value()


def raw(name: str) -> str | None:
    """The text the environment gives setting ``name`` (None when unset or empty), unparsed."""
    return _setting(name).raw()


def is_set(name: str) -> bool:
    """Whether the environment sets ``name`` (to a non-empty text)."""
    return _setting(name).raw() is not None


def default(name: str) -> Any:
    return _setting(name).default


def setting_field(name: str) -> Any:
    """A dataclass field whose default is setting ``name``'s; ``from_settings`` fills it from the environment."""
    return dataclasses.field(default=_setting(name).default, metadata={"setting": name})


def from_settings(cls: Any, **given: Any) -> Any:
    """An instance of dataclass ``cls``: each :func:`setting_field` from the environment, ``given`` as given."""
    values = {f.name: get(f.metadata["setting"]) for f in dataclasses.fields(cls)
              if "setting" in f.metadata and f.name not in given}
    return cls(**values, **given)


def child_env(base: Mapping[str, str] | None = None, drop: Iterable[str] = (), **changes: str) -> dict[str, str]:
    """The environment for a child process: ``base`` (this process's), less ``drop``, with ``changes``."""
    dropped = set(drop)
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in dropped}
    env.update(changes)
    return env


# ---- the table shown ------------------------------------------------------------------------------

def _shown(s: Setting, value: Any) -> str:
    if value is None:
        return "-"
    if s.secret:
        return "(hidden)"
    if isinstance(value, tuple):
        return ",".join(value) or "-"
    if isinstance(value, bool):
        return "1" if value else "0"
    if s.parse is _size and isinstance(value, int):
        for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
            if value and value % (1 << shift) == 0:
                return f"{value >> shift}{unit}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def report(scopes: Iterable[str] = SCOPES, environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per setting: name, value in force, where it came from (environment / default)."""
    rows = []
    for s in SETTINGS.values():
        if s.scope not in scopes:
            continue
        if s.raw(environ) is None:
            rows.append((s.name, _shown(s, s.default), "default"))
            continue
        try:
            rows.append((s.name, _shown(s, s.value(environ)), "environment"))
        except ValueError as exc:
            rows.append((s.name, "(not valid)", f"environment: {exc}"))
    name_w = max((len(r[0]) for r in rows), default=0)
    value_w = max((len(r[1]) for r in rows), default=0)
    return [f"{n:<{name_w}}  {v:<{value_w}}  {src}" for n, v, src in rows]


def problems(environ: Mapping[str, str] | None = None, skip: Iterable[str] = ()) -> list[str]:
    """The message of each setting (but those named in ``skip``) the environment gives a value
    that is not valid."""
    out = []
    skipped = set(skip)
    for s in SETTINGS.values():
        if s.name in skipped:
            continue
        try:
            s.value(environ)
        except ValueError as exc:
            out.append(str(exc))
    return out


def markdown() -> str:
    """docs/SETTINGS.md: the table, by scope."""
    out = ["# Settings", "",
           "Every environment variable discomfort reads, from `discomfort._settings` (the one place the",
           "package reads its environment). `discomfort doctor --settings` prints each with the value in",
           "force and where it came from. An unset or empty variable means the default; a value that is",
           "not valid is an error naming the variable. Regenerate this file with",
           "`python -c \"from discomfort._settings import markdown; print(markdown(), end='')\" > docs/SETTINGS.md`.",
           ""]
    titles = {"user": "The store, runs and the command line", "server": "HTTP run routes of a ComfyUI server "
              "([SECURITY.md](SECURITY.md))", "panel": "The editor panel ([PANEL.md](PANEL.md))",
              "ray": "Ray runs ([RAY.md](RAY.md))",
              "test": "Tests only (hooks of the package and the C++ core, switches of the suite and scripts)"}
    for scope in SCOPES:
        out += [f"## {titles[scope]}", "", "| variable | kind | default | what |", "|---|---|---|---|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in (f"`{s.name}`", s.kind, _shown(s, s.default), s.doc))
                + " |" for s in SETTINGS.values() if s.scope == scope]
        out.append("")
    return "\n".join(out)
