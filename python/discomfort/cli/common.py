"""Internal: what the command line's subcommands share: one-line errors and checks made before any work."""

from __future__ import annotations

import json
import os

from ..errors import CommandError

__all__ = ["CommandError", "check_output_path", "one_line", "read_json_file"]


def check_output_path(option: str, path: str) -> None:
    """Refuse, before any work, an output file that cannot be written."""
    full = os.path.abspath(os.path.expanduser(path))
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise CommandError(f"{option} {path}: that is a folder; give a file name in it")
    if not os.path.isdir(folder):
        raise CommandError(f"{option} {path}: the folder {folder} does not exist; create it first "
                           "or give another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {path}: the folder {folder} is not writable; give another path")


def one_line(exc: BaseException) -> str:
    """An exception as one line: its first line, with its type where the message alone says little."""
    from ..errors import DiscomfortError

    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, (CommandError, DiscomfortError, ValueError, OSError, ImportError)):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def read_json_file(path: str, what: str) -> object:
    """A JSON file's value; errors name the file (and where in it the JSON breaks)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not JSON text (not UTF-8)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}, "
                         f"column {exc.colno}") from None
