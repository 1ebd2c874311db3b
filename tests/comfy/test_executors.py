"""The executors themselves: ComfyUI in-process and as a server, with the node pack loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import discomfort
from discomfort.comfy import InProcessComfy, launch_server
from discomfort.sysinfo import host_info, same_host
from discomfort.errors import ComfyConnectionError, NodeExecutionError, PromptValidationError
from discomfort.workflows.format import load_workflow

pytestmark = pytest.mark.comfy

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_node_pack_loaded(executor):
    info = executor.object_info("DiscomfortPort")["DiscomfortPort"]
    assert info["output_node"] is True
    assert info["input"]["required"]["unique_id"][0] == "STRING"
    assert "input_data" in info["input"]["optional"]
    assert set(info["input"]["hidden"]) >= {"run_id", "prompt", "node_id"}
    loader = executor.object_info("DiscomfortDataLoader")["DiscomfortDataLoader"]
    assert set(loader["input"]["required"]) == {"run_id", "unique_id"}
    assert loader["output_node"] is False


def test_inprocess_is_one_per_process(inprocess, comfy_path, tmp_path):
    assert InProcessComfy(comfy_path, isolated=True) is inprocess
    assert InProcessComfy(str(comfy_path)) is inprocess
    with pytest.raises(RuntimeError, match="already loaded"):
        InProcessComfy(tmp_path)


def test_unknown_node_is_a_validation_error(executor):
    with pytest.raises(PromptValidationError, match="NoSuchNode") as info:
        executor.execute({"1": {"class_type": "NoSuchNode", "inputs": {}}}, timeout=60)
    assert isinstance(info.value.error, dict)


def test_bad_input_is_a_validation_error_naming_the_node(executor):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0}},
        "7": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus",
                                                      "width": 8, "height": 8, "crop": "disabled"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    with pytest.raises(PromptValidationError, match="node 7 \\(ImageScale\\)") as info:
        executor.execute(prompt, timeout=60)
    assert "7" in info.value.node_errors


def test_port_without_run_id_is_a_plain_passthrough(executor):
    """Workflows with ports still run as they are (in the ComfyUI editor): nothing is saved."""
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 2, "batch_size": 1, "color": 0}},
        "2": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "a", "input_data": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        "4": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "b", "input_data": ["1", 0]}},
    }
    outputs = executor.execute(prompt, timeout=60)
    assert set(outputs) == {"3"}  # the ports add no UI payload
    assert outputs["3"]["images"][0]["type"] == "temp"


@pytest.mark.parametrize("name", ["ui_basic", "ui_reroute", "ui_primitive", "ui_widget_input", "ui_notes_groups"])
def test_converted_ui_workflows_run(executor, name):
    """What load_workflow makes of UI-format files is a prompt ComfyUI accepts and runs."""
    prompt = load_workflow(FIXTURES / "workflows" / f"{name}.json", executor.object_info())
    outputs = executor.execute(prompt, timeout=60)
    assert any("images" in ui for ui in outputs.values())


def test_failing_node_names_its_id(executor):
    prompt = {
        "4": {"class_type": "DiscomfortDataLoader", "inputs": {"run_id": "no-such-run", "unique_id": "x"}},
        "5": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "y", "input_data": ["4", 0]}},
    }
    with pytest.raises(NodeExecutionError) as info:
        executor.execute(prompt, timeout=60)
    err = info.value
    assert err.node_id == "4" and err.class_type == "DiscomfortDataLoader"
    assert "no-such-run" in err.message and "'x'" in err.message
    assert "node 4" in str(err) and "DiscomfortDataLoader" in str(err) and "no-such-run" in str(err)


def test_object_info_fixture_matches_server(server):
    """tests/fixtures/object_info_subset.json is still what this ComfyUI answers."""
    saved = json.loads((FIXTURES / "object_info_subset.json").read_text())
    live = server.object_info()
    for name, info in saved.items():
        assert name in live, name
        for key in ("input_order", "output", "output_node"):
            assert live[name][key] == info[key], (name, key)
        if name not in ("LoadImage", "Load3D"):  # their file lists depend on the input folder
            assert live[name]["input"] == info["input"], name


def test_inprocess_object_info_matches_server(inprocess, server):
    names = ["EmptyImage", "KSampler", "DiscomfortPort", "SolidMask", "PrimitiveInt"]
    live = server.object_info()
    mine = inprocess.object_info()
    for name in names:
        for key in ("input", "input_order", "output", "output_node", "name"):
            assert mine[name][key] == live[name][key], (name, key)


def test_host_info_route(server):
    remote = server.host_info()
    local = host_info(remote["nonce"])
    for key in ("nonce", "host", "user", "shm"):  # same host, user and /dev/shm: the same digests
        assert remote[key] == local[key] and remote[key], key
    assert remote["version"] == discomfort.__version__
    assert same_host(local, remote)
    other = server.host_info()
    assert other["nonce"] != remote["nonce"] and other["host"] != remote["host"]


def test_server_helpers(server):
    stats = server.get_json("/system_stats")
    assert "system" in stats
    server.free()  # acted on between prompts; the next run still works
    assert server.execute({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 2, "height": 2, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }, timeout=60)


def test_launch_failure_reports_log_tail(comfy_path, tmp_path):
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\necho 'boom: this is not python' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(ComfyConnectionError, match="(?s)exited with code 3.*boom: this is not python"):
        with launch_server(comfy_path, isolated=True, python=str(fake), work_dir=tmp_path / "w"):
            pass


def test_timeout_on_server(server):
    with pytest.raises(TimeoutError):
        server.execute({
            "1": {"class_type": "EmptyImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 2, "color": 0}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
            "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
            "5": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "t", "input_data": ["4", 0]}},
        }, timeout=0.01)


def test_timeout_in_process(inprocess):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 4, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "5": {"class_type": "DiscomfortPort", "inputs": {"unique_id": "t", "input_data": ["4", 0]}},
    }
    inprocess.free()  # nothing of it cached: its nodes really run
    with pytest.raises(TimeoutError):
        inprocess.execute(prompt, timeout=0.001)
    inprocess.free()
    assert inprocess.execute({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 2, "height": 2, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }, timeout=60)
