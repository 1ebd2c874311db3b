"""Windows' paths and names, checked here: device names (CON, NUL, COM1, aux.txt), names ending in
a dot or a space, drive letters, backslashes, %TEMP% and the portable build's
python_embeded\\python.exe. Where a name someone gave becomes a file name (the command line's
outputs, --keep and --input-dir folders; the panel's per-iteration outputs) it is made safe on
every system (discomfort._names.safe_file_stem); where it names an existing file (the panel's
workflow and input names) Windows' rules apply on Windows, so those run under the win32
simulation (DISCOMFORT_TEST_PLATFORM=win32, read once at import: a fresh process each).
Windows paths are taken apart with ntpath."""

from __future__ import annotations

import argparse
import json
import ntpath
import os
import re
import stat
import subprocess
import sys
import textwrap

import pytest

from _simplatform import last_json, simulated_env
from discomfort._names import safe_file_stem, unique_stem, windows_name_problem
from discomfort._platform import PLATFORM

# (a name as given, the file stem it becomes)
NAME_FORMS = [
    ("CON", "_CON"), ("con", "_con"), ("NUL", "_NUL"), ("PRN.txt", "_PRN.txt"), ("aux.txt", "_aux.txt"),
    ("COM1", "_COM1"), ("LPT1", "_LPT1"), ("lpt9.tar.gz", "_lpt9.tar.gz"), ("CONOUT$", "CONOUT"),
    ("name.", "name"), ("name ", "name"), ("name. .", "name"), ("C:\\Users\\me\\photo", "C_Users_me_photo"),
    ("%TEMP%\\out", "TEMP_out"), ("..\\..\\evil", "evil"), ("../../evil", "evil"), ("a:b", "a_b"),
    ("what?*|<>", "what"), ("", "value"), ("...", "value"),
    ("CONSOLE", "CONSOLE"), ("COM10", "COM10"), ("image", "image"), ("x.json", "x.json"),
]


def simulated(tmp_path, code: str, platform: str | None = "win32", **env: str) -> dict:
    """Run ``code`` in a fresh process that takes this system for ``platform`` (tests/_simplatform;
    None: the system this process takes itself for), with no temp directory setting but ``env``'s;
    its last stdout line is JSON."""
    base = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TEMP", "TMP")}
    if platform is not None:
        base = simulated_env(platform, base)
    else:
        base = {k: v for k, v in base.items() if not k.startswith("DISCOMFORT_") or k == "DISCOMFORT_TEST_PLATFORM"}
    base.update(env)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=base, cwd=tmp_path, timeout=300)
    return last_json(proc)


# ---- the names themselves --------------------------------------------------------------------------


@pytest.mark.parametrize("given,stem", NAME_FORMS, ids=[repr(g) for g, _ in NAME_FORMS])
def test_each_name_form_becomes_one_plain_windows_name(given, stem):
    assert safe_file_stem(given) == stem
    assert windows_name_problem(stem) is None
    assert ntpath.splitdrive(stem)[0] == "" and ntpath.basename(stem) == stem
    assert safe_file_stem(stem) == stem  # stable: a stem stays itself


@pytest.mark.parametrize("part,problem", [
    ("CON.json", "device name"), ("nul", "device name"), ("COM1.png", "device name"), ("LPT1", "device name"),
    ("aux.txt", "device name"), ("CONIN$", "device name"), ("con .json", "device name"),
    ("wf.json.", "ending in a dot"), ("wf ", "ending in a dot or a space"),
    ("a:b.json", "':'"), ("C:", "':'"), ("a\\b", "'\\\\'"), ("x|y", "'|'"), ("q?.png", "'?'"), ("", "empty"),
])
def test_windows_name_problem_says_what_is_wrong(part, problem):
    said = windows_name_problem(part)
    assert said is not None and problem in said, said


@pytest.mark.parametrize("part", ["CONSOLE.json", "COM10", "wf.json", ".hidden", "nul_.txt", "auxiliary"])
def test_windows_name_problem_lets_plain_names_be(part):
    assert windows_name_problem(part) is None


def test_unique_stem_ignores_case_as_windows_and_macos_folders_do():
    taken: set[str] = set()
    assert [unique_stem(s, taken) for s in ("Image", "image", "IMAGE", "mask")] == ["Image", "image-2", "IMAGE-3", "mask"]


# ---- the disk tier: keys never become file names; %TEMP% -----------------------------------------

DISK_KEYS = ["CON", "nul.", "aux.txt", "COM1", "C:\\x\\y", "..\\..\\evil", "a:b|c", "Image", "image"]


@pytest.mark.parametrize("platform", ["win32", None], ids=["win32", "this-system"])
def test_disk_tier_files_are_numbered_whatever_the_key(tmp_path, platform):
    """Every value over the RAM budget goes to a file named by its number; on Windows the disk
    tier lives in %TEMP% (TEMP, as Windows sets it; no TMPDIR there)."""
    import discomfort

    temp = tmp_path / "temp"
    temp.mkdir()
    env = {"TEMP": str(temp)} if platform == "win32" else {"TMPDIR": str(temp)}
    out = simulated(tmp_path, f"""
        import json, os
        import numpy as np
        import discomfort
        from discomfort import WorkflowContext, sysinfo
        keys = {DISK_KEYS!r}
        root = sysinfo.disk_root()
        with WorkflowContext(ram_budget=1 << 20) as ctx:
            for i, key in enumerate(keys):
                ctx.save(key, np.full(1 << 18, i, dtype=np.int64))  # 2 MiB each: over the budget
            files = sorted(f for _, _, fs in os.walk(root) for f in fs)
            same = all(int(ctx.load(k)[-1]) == i and ctx.load(k).shape == (1 << 18,) for i, k in enumerate(keys))
        left = sorted(f for _, _, fs in os.walk(root) for f in fs)
        print(json.dumps({{"mode": discomfort.store_mode, "root": root, "files": files, "same": same, "left": left}}))
    """, platform, **env)
    assert out["mode"] == ("local" if platform == "win32" else discomfort.store_mode)
    assert os.path.commonpath([out["root"], str(temp)]) == str(temp), out["root"]
    objects = [f for f in out["files"] if re.fullmatch(r"[0-9a-f]{16}\.obj", f)]
    assert len(objects) == len(DISK_KEYS), out["files"]
    assert all(windows_name_problem(f) is None for f in out["files"]), out["files"]
    assert out["same"] and out["left"] == []


# ---- the panel ---------------------------------------------------------------------------------

PANEL_NAMES = ["CON.json", "aux.json", "sub./wf.json", "NUL/wf.json", "ab:c.json", "com1.json"]
ALWAYS_REFUSED = ["C:\\wf.json", "C:wf.json", "sub\\wf.json", "\\\\server\\share\\wf.json", "//server/share/wf.json",
                  "/etc/wf.json", "../wf.json"]


def _panel_folder(tmp_path):
    """The workflows folder, with a file of each name where this system can hold them (Windows
    refuses the names before looking for the files)."""
    root = tmp_path / "workflows"
    for name in (PANEL_NAMES if sys.platform != "win32" else []) + ["ok.json", "sub/ok.json"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("{}", encoding="utf-8")
    return root


def test_panel_names_windows_cannot_hold_are_refused_on_windows_only(tmp_path):
    """On Windows, "CON.json" would open the console and "ab:c.json" a stream of "ab": the panel
    says so (400) there, even where such a file exists; elsewhere they are ordinary files."""
    from discomfort.panel.io import InvalidName, PanelLimits, safe_file

    root = _panel_folder(tmp_path)
    for name in PANEL_NAMES:
        if PLATFORM == "win32":
            with pytest.raises(InvalidName):
                safe_file(root, name, "workflow", PanelLimits(), (".json",))
        else:
            assert safe_file(root, name, "workflow", PanelLimits(), (".json",)) == os.path.realpath(root / name)
    out = simulated(tmp_path, f"""
        import json
        from discomfort.panel.io import InvalidName, PanelLimits, safe_file
        said = {{}}
        for name in {PANEL_NAMES + ALWAYS_REFUSED + ["ok.json", "sub/ok.json"]!r}:
            try:
                said[name] = "ok " + safe_file({str(root)!r}, name, "workflow", PanelLimits(), (".json",))
            except InvalidName as exc:
                said[name] = "400 " + str(exc)
        print(json.dumps(said))
    """)
    assert out["ok.json"] == f"ok {os.path.realpath(root / 'ok.json')}"
    assert out["sub/ok.json"] == f"ok {os.path.realpath(root / 'sub' / 'ok.json')}"
    expect = {"CON.json": "device name", "aux.json": "device name", "com1.json": "device name",
              "NUL/wf.json": "device name", "sub./wf.json": "ending in a dot", "ab:c.json": "':'"}
    for name, problem in expect.items():
        assert out[name].startswith(f"400 workflow {name!r}: ") and problem in out[name], out[name]
    for name in ALWAYS_REFUSED:
        assert out[name].startswith("400 "), out[name]


def test_panel_outputs_get_windows_safe_names_distinct_ignoring_case(tmp_path):
    pytest.importorskip("numpy")
    pytest.importorskip("PIL")
    from discomfort.panel.io import PanelLimits, save_outputs

    values = {"CON": "a", "aux.txt": "b", "Image": "c", "image": "d", "C:\\out\\nul": {"k": 1}, "name.": "e"}
    listed = save_outputs(values, {}, str(tmp_path), "discomfort/run/00001", PanelLimits())
    names = {o["key"]: o["filename"] for o in listed}
    assert names == {"CON": "_CON.txt", "aux.txt": "_aux.txt.txt", "Image": "Image.txt", "image": "image_2.txt",
                     "C:\\out\\nul": "C_out_nul.json", "name.": "name.txt"}
    assert (tmp_path / "image_2.txt").read_text(encoding="utf-8") == "d"
    assert json.loads((tmp_path / "C_out_nul.json").read_text(encoding="utf-8")) == {"k": 1}


# ---- the command line --------------------------------------------------------------------------


def test_cli_outputs_and_kept_iterations_get_windows_safe_names(tmp_path, capsys):
    from discomfort.cli.run import _report
    from discomfort.engine import Result

    result = Result({"CON": "last", "Image": "a", "image": "b", "C:\\x\\aux": [1, 2]})
    result.iterations = 2
    result.history = {"CON": ["one", "two"], "NUL.": ["n1", "n2"], "nul": ["m1", "m2"]}
    _report(argparse.Namespace(keep=["CON", "NUL.", "nul", "CON"], until=None), result, tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == sorted(["_CON.txt", "Image.txt", "image-2.txt", "C_x_aux.json", "_CON_it001.txt", "_CON_it002.txt",
                            "_NUL_it001.txt", "_NUL_it002.txt", "_nul-2_it001.txt", "_nul-2_it002.txt"])
    assert (tmp_path / "_nul-2_it002.txt").read_text(encoding="utf-8") == "m2"
    assert (tmp_path / "_NUL_it001.txt").read_text(encoding="utf-8") == "n1"
    assert "10 file(s) written" in capsys.readouterr().out


def test_cli_inputs_keep_their_windows_drive_and_backslashes():
    from discomfort.cli.loops import input_dir_jobs
    from discomfort.cli.run import parse_input_spec

    key, path = parse_input_spec("image=C:\\Users\\me\\My Photos\\cat=1.png")
    assert key == "image" and ntpath.splitdrive(str(path)) == ("C:", "\\Users\\me\\My Photos\\cat=1.png")
    with pytest.raises(ValueError, match=re.escape("--input-dir image=D:\\photos: no such folder")):
        input_dir_jobs(["image=D:\\photos"], {}, (".png",))


def test_cli_input_dir_runs_get_one_windows_safe_folder_each(tmp_path):
    """--input-dir: each input's outputs go to a folder named after it, made safe, and distinct
    also where the names differ in case only or become the same stem."""
    from discomfort.cli.loops import input_dir_jobs

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "Photo.png").write_bytes(b"1")
    case_sensitive = not (photos / "photo.png").exists()
    names = ["a b", "a_b", "Photo"] + (["photo"] if case_sensitive else []) + (["CON"] if sys.platform != "win32" else [])
    for name in names:
        (photos / f"{name}.png").write_bytes(b"1")
    jobs = input_dir_jobs([f"image={photos}"], {}, (".png",))
    folders = {name: folder for name, folder, _ in jobs}
    expect = {"a b": "a_b", "a_b": "a_b-2", "Photo": "Photo", "photo": "photo-2", "CON": "_CON"}
    assert folders == {n: expect[n] for n in names}
    assert all(files == {"image": photos / f"{name}.png"} for name, _, files in jobs)
    assert input_dir_jobs([], {}, (".png",)) == [(None, None, {})]


# ---- install-comfyui: the portable build -------------------------------------------------------


def _program(path, target: str = sys.executable):
    """An executable file at ``path`` that runs ``target`` (the embedded python.exe stand-in)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n', encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _portable(tmp_path, embedded: str = "python_embeded"):
    root = tmp_path / "ComfyUI_windows_portable"
    (root / "ComfyUI").mkdir(parents=True)
    (root / "ComfyUI" / "main.py").write_text("", encoding="utf-8")
    return root, _program(root / embedded / "python.exe")


@pytest.mark.parametrize("embedded", ["python_embeded", "python_embedded"])
def test_install_comfyui_finds_the_portable_builds_python(tmp_path, embedded):
    from discomfort.cli.install import find_comfy_python

    root, exe = _portable(tmp_path, embedded)
    assert find_comfy_python(root / "ComfyUI") == exe
    venv = _program(root / "ComfyUI" / "venv" / "Scripts" / "python.exe")  # a venv of its own comes first
    assert find_comfy_python(root / "ComfyUI") == venv


def test_install_comfyui_says_where_it_looked(tmp_path):
    from discomfort.cli.common import CommandError
    from discomfort.cli.install import find_comfy_python

    (tmp_path / "ComfyUI").mkdir()
    with pytest.raises(CommandError, match="no python_embeded next to it.*--python"):
        find_comfy_python(tmp_path / "ComfyUI")


@pytest.mark.skipif(sys.platform == "win32", reason="the embedded python.exe stand-in here is a shell script")
def test_install_comfyui_into_the_portable_build_under_win32(tmp_path):
    """The whole command on the portable layout (given its top folder), simulated: the node pack
    lands in ComfyUI\\custom_nodes, and --remove takes it out again. The embedded python.exe runs
    this very environment, so nothing is pip-installed."""
    root, exe = _portable(tmp_path)
    out = simulated(tmp_path, f"""
        import contextlib, io, json
        from discomfort.cli import main
        said = []
        for extra in ([], ["--remove"]):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = main(["install-comfyui", {str(root)!r}, *extra])
            said.append([rc, buf.getvalue()])
        print(json.dumps(said))
    """)
    (rc, text), (rc_remove, text_remove) = out
    pack = root / "ComfyUI" / "custom_nodes" / "discomfort_nodes"
    assert rc == 0 and f"installed for {exe}" in text and f"copied the node pack to {pack}" in text, text
    assert rc_remove == 0 and f"removed {pack}" in text_remove, text_remove
    assert not pack.exists() and (root / "ComfyUI" / "custom_nodes").is_dir()


def test_install_comfyui_reads_a_windows_wheel_url(tmp_path):
    """pip records where a package came from as a file: URL; on Windows that is a drive or a share."""
    out = simulated(tmp_path, """
        import json
        from urllib.parse import urlparse
        from discomfort.cli.install import _file_url_path
        urls = ["file:///C:/Users/Me/My%20Wheels/discomfort-0.1.0-py3-none-win_amd64.whl",
                "file://server/share/w/discomfort.whl", "file://localhost/D:/w/discomfort.whl"]
        print(json.dumps([_file_url_path(urlparse(u)) for u in urls]))
    """)
    assert out[0] == "C:\\Users\\Me\\My Wheels\\discomfort-0.1.0-py3-none-win_amd64.whl"
    assert ntpath.splitdrive(out[1]) == ("\\\\server\\share", "\\w\\discomfort.whl")
    assert ntpath.splitdrive(out[2]) == ("D:", "\\w\\discomfort.whl")
    if PLATFORM != "win32":
        from urllib.parse import urlparse

        from discomfort.cli.install import _file_url_path

        assert _file_url_path(urlparse("file:///home/me/My%20Wheels/d.whl")) == "/home/me/My Wheels/d.whl"
