"""The `discomfort` command: bench, doctor, run."""

from __future__ import annotations

import argparse
import sys


def _cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import _backend, bench

    backends = [args.backend] if args.backend else _backend.available()
    sizes = bench.QUICK_SIZES[:2] if args.quick else tuple(args.sizes or bench.QUICK_SIZES)
    rounds = 3 if args.quick else args.rounds
    with tqdm(total=None, desc="bench", unit="step", disable=args.no_progress, file=sys.stderr) as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        rows = bench.run(sizes, backends, rounds, disk_tier=not args.quick, legacy=True, progress=progress)
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
    from . import doctor

    report = doctor.collect(disk_root=args.disk_dir)
    print(doctor.format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="discomfort", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="measure save/load against memcpy and the legacy path")
    p.add_argument("--quick", action="store_true", help="small sizes, RAM tier only (under ~20 s)")
    p.add_argument("--sizes", nargs="+", choices=["1 MiB", "12 MiB", "192 MiB", "512 MiB"], metavar="SIZE",
                   help='sizes to run, e.g. --sizes "12 MiB" "512 MiB"')
    p.add_argument("--rounds", type=int, default=7, help="rounds per measurement (median reported)")
    p.add_argument("--backend", choices=["native", "python"], help="only this backend (default: every one)")
    p.add_argument("--json", metavar="FILE", help="write the raw numbers as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw the ratios (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("doctor", help="what this machine offers a run, and advice")
    p.add_argument("--disk-dir", default=None, help="disk root to check (default: the one runs use)")
    p.set_defaults(func=_cmd_doctor)

    from .cli_run import add_run_parser

    add_run_parser(sub)

    from .cli_convert import add_convert_parser

    add_convert_parser(sub)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
