"""Internal: ``discomfort convert``: a UI-format workflow to the API prompt ComfyUI's editor would queue."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import read_json_file
from ..errors import UnsupportedWorkflowError


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
        info = read_json_file(args.object_info, "--object-info file")
        if not isinstance(info, dict):
            raise ValueError(f"--object-info file {args.object_info} is not an /object_info answer (a JSON object)")
        return info
    import requests

    url = args.server.rstrip("/")
    try:
        response = requests.get(url + "/object_info", timeout=60)
    except requests.ConnectionError:
        raise ConnectionError(f"nothing answers at {url}: is ComfyUI running there? Start it, or give its "
                              "address with --server URL (or a saved /object_info with --object-info FILE)") from None
    except requests.Timeout:
        raise TimeoutError(f"the ComfyUI server at {url} did not answer /object_info in 60 s") from None
    if response.status_code != 200:
        raise ConnectionError(f"GET {url}/object_info answered HTTP {response.status_code}: is that a ComfyUI server?")
    try:
        return response.json()
    except ValueError:
        raise ValueError(f"GET {url}/object_info did not answer JSON: is that a ComfyUI server?") from None


def convert_command(args: argparse.Namespace) -> int:
    """Exit 0 with the prompt; 1 (one line on stderr) when refused or unreadable."""
    from ..workflows.format import load_workflow

    try:
        workflow = read_json_file(args.workflow, "workflow file")
        if not isinstance(workflow, dict):
            raise ValueError(f"workflow file {args.workflow} holds no workflow (a JSON object)")
        if args.output:
            from .common import check_output_path

            check_output_path("-o", args.output)
        prompt = load_workflow(workflow, _object_info(args))
    except (UnsupportedWorkflowError, ValueError, OSError) as e:
        print(f"discomfort convert: {e}".splitlines()[0], file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        from .common import one_line

        print(f"discomfort convert: {one_line(e)}", file=sys.stderr)
        return 1
    text = json.dumps(prompt, indent=1, ensure_ascii=False) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
