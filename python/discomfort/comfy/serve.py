"""Internal: run ComfyUI's ``main.py`` with the torchvision shim active (used by :func:`launch_server`).

    python -m discomfort.comfy.serve COMFY_PATH [main.py arguments...]

Installs the shim, makes ``COMFY_PATH`` the working directory and first ``sys.path`` entry, and
runs ``main.py`` as ``__main__``, exactly as ``python main.py ...`` would.
"""

from __future__ import annotations

import os
import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    comfy_path = os.path.abspath(argv[0])
    main_py = os.path.join(comfy_path, "main.py")
    if not os.path.isfile(main_py):
        raise SystemExit(f"{comfy_path} is not a ComfyUI tree (no main.py)")

    from discomfort.comfy import _tvshim

    _tvshim.install()
    os.chdir(comfy_path)
    # As for `python main.py`: the script's folder first on sys.path, not this package's.
    sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
    sys.path.insert(0, comfy_path)
    sys.argv = [main_py, *argv[1:]]
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
