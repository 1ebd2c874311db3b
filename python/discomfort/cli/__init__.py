"""The `discomfort` command: demo, bench, doctor, run, convert, install-comfyui.

Errors are one line on stderr (``discomfort COMMAND: error: ...``, with what to do) and a
non-zero exit: 2 for a wrong command line, 1 for anything else, 130 for Ctrl-C.
``DISCOMFORT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import NoReturn

from .. import _settings
from .common import CommandError, check_output_path, one_line

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a wrong command line is one line (plus where to look), not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


_SIZE_ARG = re.compile(r"^\s*(\d+)\s*mib\s*$", re.IGNORECASE)


def bench_sizes(values: list[str]) -> tuple[str, ...]:
    """``["12 MiB", "192MiB"]`` or ``["1MiB,12MiB"]`` (as DISCOMFORT_BENCH_SIZES) -> bench.SIZES keys."""
    from .. import bench

    out: list[str] = []
    for value in values:
        for part in filter(None, (p.strip() for p in value.split(","))):
            m = _SIZE_ARG.match(part)
            name = f"{int(m.group(1))} MiB" if m else part
            if name not in bench.SIZES:
                raise CommandError(f"--sizes {part!r}: choose from {', '.join(bench.SIZES)} "
                                   "(written '12 MiB' or '12MiB')")
            if name not in out:
                out.append(name)
    return tuple(out)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .. import _backend, bench

    available = _backend.available()
    if args.backend and args.backend not in available:
        raise CommandError(f"--backend {args.backend}: not available here (available: {', '.join(available)}); "
                           "see `discomfort doctor`")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CommandError(f'--plot needs matplotlib: pip install "discomfort[plot]" (or leave out --plot)') \
                from None
        check_output_path("--plot", args.plot)
    if args.json:
        check_output_path("--json", args.json)
    backends = [args.backend] if args.backend else available
    if args.sizes:
        sizes = bench_sizes(args.sizes)
    else:
        sizes = bench.QUICK_SIZES[:2] if args.quick else bench.QUICK_SIZES
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 7)
    try:
        import torch  # noqa: F401  (the benchmark's values are torch tensors)
    except ImportError:
        raise CommandError('the benchmark needs torch: pip install "discomfort[torch]"') from None

    from tqdm import tqdm

    disable = args.no_progress or not sys.stderr.isatty()  # no bar in logs
    with tqdm(total=None, desc="bench", unit="step", disable=disable, file=sys.stderr) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        rows = bench.run(sizes, backends, rounds, disk_tier=not args.quick, legacy=True, progress=progress,
                         http=not args.quick and bench.http_available())
    print(bench.format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(bench.to_json(rows))
        print(f"\nraw numbers written to {args.json}")
    if args.plot:
        bench.plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .. import doctor

    if args.settings:
        print("\n".join(_settings.report()))
        bad = _settings.problems()
        for problem in bad:
            print(f"discomfort doctor: {problem}", file=sys.stderr)
        return 1 if bad else 0

    report = doctor.collect(disk_root=args.disk_dir)
    print(doctor.format_report(report))
    for problem in report.get("problems", []):
        print(f"discomfort doctor: {problem}", file=sys.stderr)
    return 1 if report.get("problems") else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="discomfort", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .demo import add_demo_parser

    add_demo_parser(sub)

    p = sub.add_parser("bench", help="measure save/load against memcpy and the legacy path")
    p.add_argument("--quick", action="store_true",
                   help="RAM tier only (no disk tier, no HTTP rows), 64 and 256 KiB unless --sizes, 3 rounds "
                        "unless --rounds (under ~20 s)")
    p.add_argument("--sizes", nargs="+", metavar="SIZE",
                   help='sizes to run: 1, 12, 192 or 512 MiB, e.g. --sizes "12 MiB" 512MiB (or 1MiB,12MiB)')
    p.add_argument("--rounds", type=_positive_int, default=None, metavar="N",
                   help="rounds per measurement, median reported (default 7; 3 with --quick)")
    p.add_argument("--backend", choices=["native", "python"], help="only this backend (default: every one)")
    p.add_argument("--json", metavar="FILE", help="write the raw numbers as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the ratios (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none anyway when stderr is "
                   "not a terminal)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("doctor", help="what this machine offers a run, checked by a tiny run; exit 1 on a problem")
    p.add_argument("--disk-dir", default=None, help="disk root to check (default: the one runs use)")
    p.add_argument("--settings", action="store_true",
                   help="print every setting (environment variable) with its value in force and where it came "
                        "from, nothing else (docs/SETTINGS.md); exit 1 when one is not valid")
    p.set_defaults(func=_cmd_doctor)

    from .run import add_run_parser

    add_run_parser(sub)

    from .convert import add_convert_parser

    add_convert_parser(sub)

    from .install import add_install_parser

    add_install_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"discomfort {args.command}"
    try:
        debug = _settings.get("DISCOMFORT_DEBUG")
    except ValueError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    if debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        print(f"{name}: interrupted{': ' + one_line(exc) if str(exc) else ''}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the command line shows one line, never a traceback
        print(f"{name}: error: {one_line(exc)}", file=sys.stderr)
        return 1

