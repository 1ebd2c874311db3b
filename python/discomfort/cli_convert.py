"""``discomfort convert``: a UI-format workflow to the API prompt ComfyUI's editor would queue."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UnsupportedWorkflowError


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="UI-format workflow -> API-format prompt (as the editor queues it)")
    p.add_argument("workflow", help="workflow JSON (UI or API format)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", metavar="URL", help="ComfyUI server whose /object_info to use")
    src.add_argument("--object-info", metavar="FILE", help="a saved /object_info JSON")
    p.add_argument("-o", "--output", metavar="OUT", help="write here (default: stdout)")
    p.set_defaults(func=convert_command)


def _object_info(args: argparse.Namespace) -> dict:
    if args.object_info:
        return json.loads(Path(args.object_info).read_text(encoding="utf-8"))
    import requests

    response = requests.get(args.server.rstrip("/") + "/object_info", timeout=60)
    response.raise_for_status()
    return response.json()


def convert_command(args: argparse.Namespace) -> int:
    """Exit 0 with the prompt; 1 (one line on stderr) when refused or unreadable."""
    from .workflow_format import load_workflow

    try:
        prompt = load_workflow(args.workflow, _object_info(args))
    except (UnsupportedWorkflowError, ValueError, OSError) as e:
        print(f"discomfort convert: {e}".splitlines()[0], file=sys.stderr)
        return 1
    except Exception as e:  # the server did not answer
        print(f"discomfort convert: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    text = json.dumps(prompt, indent=1, ensure_ascii=False) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
