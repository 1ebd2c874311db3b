"""The user's ComfyUI by default: ``InProcessComfy(tree)`` and ``launch_server(tree)`` with no other
argument run the tree as its ``main.py`` would: its own custom nodes, ``input/`` and ``output/``
folders and database, this project's pack added only where the tree lacks it, and ``--cpu`` only
where the torch that runs it sees no accelerator.

The tree is a copy of ``$DISCOMFORT_COMFYUI`` (hard links: ComfyUI only reads its code) with
fresh ``input/``, ``output/``, ``user/`` and ``custom_nodes/`` folders, so the shared tree is
never written to. The in-process executor runs in a fresh subprocess (one ComfyUI per process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

from discomfort.comfy import _startup, launch_server  # noqa: E402
from discomfort.comfy.launcher import server_args  # noqa: E402
from discomfort.errors import ComfyConnectionError  # noqa: E402

pytestmark = pytest.mark.comfy

NODE_PACK = Path(__file__).resolve().parents[2] / "comfy_nodes"
USER_NODE = '''
class UserInvert:
    """A user's own node: 1 - image."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "user"

    def run(self, image):
        return (1.0 - image,)

NODE_CLASS_MAPPINGS = {"UserInvert": UserInvert}
'''
PROMPT = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
    "2": {"class_type": "UserInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "user_tree"}},
}
PIXELS = (np.arange(5 * 7 * 3).reshape(5, 7, 3) * 2).astype(np.uint8)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def user_tree(comfy_path: Path, dest: Path) -> Path:
    """A ComfyUI tree as a user has it: a custom node of theirs and a picture in ``input/``."""
    shutil.copytree(comfy_path, dest, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(
        "__pycache__", "user", "output", "input", "temp", "custom_nodes", ".discomfort-comfyui.json"))
    for sub in ("input", "output", "custom_nodes/user_nodes"):
        (dest / sub).mkdir(parents=True)
    (dest / "custom_nodes" / "user_nodes" / "__init__.py").write_text(USER_NODE)
    Image.fromarray(PIXELS).save(dest / "input" / "photo.png")
    return dest


def _saved(tree: Path, outputs: dict) -> Path:
    (image,) = outputs["3"]["images"]
    assert image["type"] == "output"
    path = tree / "output" / image["subfolder"] / image["filename"]
    assert path.is_file(), sorted(p.name for p in (tree / "output").iterdir())
    with Image.open(path) as img:
        got = np.asarray(img.convert("RGB")).astype(int)
    assert np.abs(got - (255 - PIXELS.astype(int))).max() <= 1  # SaveImage truncates 255 * (1 - x)
    return path


_IN_PROCESS = r"""
import json, os, sys
from pathlib import Path
from discomfort.comfy import InProcessComfy
from discomfort.workflows.tools import resolve_executor

tree, prompt = sys.argv[1], json.loads(sys.argv[2])
comfy = resolve_executor(None)  # what run_sequential(executor=None) uses: $DISCOMFORT_COMFYUI
assert comfy is InProcessComfy(tree)
outputs = comfy.execute(prompt, timeout=120)
print(json.dumps({"outputs": outputs, "output_dir": str(comfy.output_dir), "cpu": comfy.cpu,
                  "isolated": comfy.isolated, "packs": [str(p) for p in comfy.node_packs],
                  "port": "DiscomfortPort" in comfy.node_class_mappings,
                  "user_node": comfy.node_class_mappings["UserInvert"].__module__}))
"""


def test_inprocess_runs_the_users_tree(comfy_path, tmp_path):
    tree = user_tree(comfy_path, tmp_path / "ComfyUI")
    env = {**os.environ, "DISCOMFORT_COMFYUI": str(tree)}
    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(tree), json.dumps(PROMPT)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    _saved(tree, got["outputs"])
    assert Path(got["output_dir"]) == tree / "output"
    assert got["isolated"] is False and got["cpu"] is (_startup.probe_accelerator() is None)
    assert got["port"] and len(got["packs"]) == 1 and Path(got["packs"][0]).name in ("node_pack", "comfy_nodes")
    assert "user_nodes" in got["user_node"]
    assert (tree / "user" / "comfyui.db").is_file()  # ComfyUI's own database, in the tree's user/


def test_server_runs_the_users_tree_with_its_own_pack(comfy_path, tmp_path):
    tree = user_tree(comfy_path, tmp_path / "ComfyUI")
    # As `discomfort install-comfyui --link` places it: the tree has the pack, none is added.
    (tree / "custom_nodes" / "discomfort_nodes").symlink_to(NODE_PACK, target_is_directory=True)
    assert _startup.packs_to_add(tree, None, isolated=False) == []
    with launch_server(tree) as server:
        assert server.output_dir == tree / "output"
        info = server.object_info("DiscomfortPort")["DiscomfortPort"]
        assert info["python_module"] == "custom_nodes.discomfort_nodes"
        outputs = server.execute(PROMPT, timeout=120)
        _saved(tree, outputs)
        assert "UserInvert" in server.object_info("UserInvert")
    assert (tree / "user" / "comfyui.db").is_file()


def test_isolated_loads_only_the_given_packs(comfy_path, tmp_path):
    tree = user_tree(comfy_path, tmp_path / "ComfyUI")
    args = server_args(tree, tmp_path / "work", _startup.packs_to_add(tree, [NODE_PACK], isolated=True),
                       isolated=True, cpu=True, api_nodes=False)
    assert args[args.index("--output-directory") + 1] == str(tmp_path / "work" / "output")
    assert args[args.index("--whitelist-custom-nodes") + 1:][:1] == ["discomfort_nodes"]
    assert "--disable-all-custom-nodes" in args and "sqlite:///:memory:" in args
    mine = server_args(tree, tmp_path / "work2", [], isolated=False, cpu=False, api_nodes=True)
    assert mine == ["--temp-directory", str(tmp_path / "work2" / "temp"), "--disable-auto-launch"]


def test_isolated_warns_of_a_tree_pack_of_the_same_name(comfy_path, tmp_path, caplog):
    tree = user_tree(comfy_path, tmp_path / "ComfyUI")
    (tree / "custom_nodes" / "discomfort_nodes").mkdir()
    with caplog.at_level("WARNING", logger="discomfort.comfy.launcher"):
        server_args(tree, tmp_path / "work", [NODE_PACK], isolated=True, cpu=True, api_nodes=False)
    assert "['discomfort_nodes']" in caplog.text and "loads those as well" in caplog.text


# ------------------------------------------------------------------------------- --cpu or the GPU


def test_cpu_only_where_no_accelerator_is_seen():
    assert _startup.use_cpu(None, None) is True
    for found in ("cuda", "rocm", "mps", "xpu", "npu", "mlu"):
        assert _startup.use_cpu(None, found) is False
        assert _startup.use_cpu(True, found) is True
    assert _startup.use_cpu(False, None) is False
    with pytest.raises(TypeError, match="cpu must be True, False or None"):
        _startup.use_cpu("yes", None)  # type: ignore[arg-type]


def test_probe_asks_the_torch_of_the_python_that_runs_comfyui(tmp_path):
    import torch

    here = _startup.probe_accelerator()
    assert here in (("cuda", "rocm") if torch.cuda.is_available() else (None, "mps", "xpu", "npu", "mlu"))
    assert _startup.probe_accelerator(sys.executable) == _startup.probe_accelerator()
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    assert _startup.probe_accelerator(str(broken)) is None  # no torch answers: --cpu


def test_an_accelerator_seen_means_no_cpu_flag(comfy_path, tmp_path, monkeypatch):
    """The probe's answer injected: "cuda" starts ComfyUI without --cpu, which on a CPU-only torch
    dies as ComfyUI 0.3.75 does; where the torch has CUDA it starts on the GPU."""
    really = _startup.probe_accelerator()
    monkeypatch.setattr(_startup, "probe_accelerator", lambda *a, **k: "cuda")
    if really is not None:
        with launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK], api_nodes=False,
                           work_dir=tmp_path) as server:
            assert server.accelerator == "cuda"
            assert server.get_json("/system_stats")["devices"][0]["type"] != "cpu"
        return
    with pytest.raises(ComfyConnectionError, match="Torch not compiled with CUDA enabled") as info:
        with launch_server(comfy_path, isolated=True, custom_nodes=[NODE_PACK], api_nodes=False, work_dir=tmp_path):
            pass
    assert " --cpu " not in str(info.value).split("--- log tail")[0]


def test_the_loaded_inprocess_comfy_refuses_another_setup(inprocess, comfy_path):
    from discomfort.comfy import InProcessComfy

    assert InProcessComfy(comfy_path) is inprocess  # left out: what is loaded (the tests' isolated one)
    with pytest.raises(RuntimeError, match="already loaded in this process with isolated=True"):
        InProcessComfy(comfy_path, isolated=False)
    with pytest.raises(RuntimeError, match=f"already loaded in this process with cpu={inprocess.cpu}"):
        InProcessComfy(comfy_path, cpu=not inprocess.cpu)
