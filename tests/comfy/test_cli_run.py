"""`discomfort run`: inputs from files, outputs to files, and the command end to end."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from discomfort import cli
from discomfort.cli.run import load_input, parse_input_spec, write_output, write_outputs

Image = pytest.importorskip("PIL.Image")
safetensors_torch = pytest.importorskip("safetensors.torch")

WORKFLOWS = Path(__file__).resolve().parents[1] / "fixtures" / "workflows"


def _pixels(seed: int, h: int = 9, w: int = 13, c: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


# --------------------------------------------------------------------------------------- inputs


def test_parse_input_spec():
    assert parse_input_spec("image=a=b.png") == ("image", Path("a=b.png"))
    for bad in ("image", "=x.png", "image="):
        with pytest.raises(ValueError, match="KEY=FILE"):
            parse_input_spec(bad)


def test_png_input_is_an_exact_image_tensor(tmp_path):
    px = _pixels(1)
    Image.fromarray(px).save(tmp_path / "a.png")
    Image.fromarray(np.dstack([px, px[..., :1]])).save(tmp_path / "rgba.png")
    Image.fromarray(px[..., 0]).save(tmp_path / "gray.png")
    t = load_input(tmp_path / "a.png")
    assert t.dtype == torch.float32 and t.shape == (1, 9, 13, 3)
    assert torch.equal(t, torch.from_numpy(px.astype(np.float32) / np.float32(255))[None])
    assert torch.equal(load_input(tmp_path / "rgba.png"), t)  # alpha dropped
    gray = load_input(tmp_path / "gray.png")
    assert gray.shape == (1, 9, 13, 3) and torch.equal(gray[..., 1], gray[..., 0])


@pytest.mark.parametrize("ext", [".jpg", ".jpeg", ".webp"])
def test_lossy_image_inputs(tmp_path, ext):
    px = np.full((8, 10, 3), 200, dtype=np.uint8)
    Image.fromarray(px).save(tmp_path / f"a{ext}", quality=95)
    t = load_input(tmp_path / f"a{ext}")
    assert t.shape == (1, 8, 10, 3) and t.dtype == torch.float32
    assert float((t - 200 / 255).abs().max()) < 0.05


def test_sixteen_bit_png(tmp_path):
    gray = np.array([[0, 65535], [32768, 257]], dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    t = load_input(tmp_path / "g16.png")
    assert t.shape == (1, 2, 2, 3)
    assert torch.allclose(t[0, ..., 0], torch.from_numpy(gray.astype(np.float32) / 65535))


def test_array_and_tensor_inputs(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.save(tmp_path / "a.npy", a)
    assert torch.equal(load_input(tmp_path / "a.npy"), torch.from_numpy(a))
    np.save(tmp_path / "be.npy", a.astype(">f4"))
    assert torch.equal(load_input(tmp_path / "be.npy"), torch.from_numpy(a))

    t = torch.randn(2, 3)
    torch.save({"x": t, "n": [1, 2]}, tmp_path / "a.pt")
    got = load_input(tmp_path / "a.pt")
    assert torch.equal(got["x"], t) and got["n"] == [1, 2]

    import fractions

    torch.save(fractions.Fraction(1, 3), tmp_path / "bad.pt")  # weights_only refuses arbitrary objects
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_input(tmp_path / "bad.pt")


def test_safetensors_inputs(tmp_path):
    t = torch.randn(1, 4, 8, 8)
    safetensors_torch.save_file({"only": t}, str(tmp_path / "one.safetensors"))
    assert torch.equal(load_input(tmp_path / "one.safetensors"), t)
    two = {"a": torch.zeros(2), "b": torch.ones(3, dtype=torch.int64)}
    safetensors_torch.save_file(two, str(tmp_path / "two.safetensors"))
    got = load_input(tmp_path / "two.safetensors")
    assert set(got) == {"a", "b"} and torch.equal(got["b"], two["b"])


def test_text_and_json_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\nwörld", encoding="utf-8")
    (tmp_path / "a.json").write_text('{"n": 3, "l": [1.5, null, "x"]}')
    assert load_input(tmp_path / "a.txt") == "héllo\nwörld"
    assert load_input(tmp_path / "a.json") == {"n": 3, "l": [1.5, None, "x"]}


def test_bad_inputs(tmp_path, monkeypatch):
    (tmp_path / "a.bmp").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported input type '.bmp'.*\\.png"):
        load_input(tmp_path / "a.bmp")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_input(tmp_path / "nope.png")
    Image.fromarray(_pixels(2)).save(tmp_path / "a.png")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="needs Pillow"):
        load_input(tmp_path / "a.png")


# -------------------------------------------------------------------------------------- outputs


def test_image_outputs_are_pngs_per_batch_item(tmp_path):
    img = torch.rand(2, 5, 6, 3)
    paths = write_output("image", img, tmp_path)
    assert [p.name for p in paths] == ["image_000.png", "image_001.png"]
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (6, 5)
            expected = (img[i] * 255).round().to(torch.uint8).numpy()
            assert np.array_equal(np.asarray(im), expected)
    rgba = write_output("rgba", torch.rand(1, 4, 4, 4), tmp_path)
    one = write_output("one", torch.rand(1, 4, 4, 1), tmp_path)
    with Image.open(rgba[0]) as a, Image.open(one[0]) as b:
        assert a.mode == "RGBA" and b.mode == "L"
    clipped = write_output("hot", torch.tensor([[[[2.0, -1.0, 0.5]]]]), tmp_path)
    with Image.open(clipped[0]) as im:
        assert np.asarray(im).tolist() == [[[255, 0, 128]]]


def test_mask_outputs_are_grayscale_pngs(tmp_path):
    mask = torch.rand(3, 4, 5)
    paths = write_output("mask", mask, tmp_path)
    assert [p.name for p in paths] == ["mask_000.png", "mask_001.png", "mask_002.png"]
    with Image.open(paths[2]) as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), (mask[2] * 255).round().to(torch.uint8).numpy())


def test_other_tensors_and_arrays(tmp_path):
    ints = torch.arange(6).reshape(2, 3)
    (p,) = write_output("ints", ints, tmp_path)
    assert p.name == "ints.npy" and np.array_equal(np.load(p), ints.numpy())
    vec = torch.randn(7)
    (p,) = write_output("vec", vec, tmp_path)
    assert np.array_equal(np.load(p), vec.numpy())
    bf = torch.randn(3, 2).to(torch.bfloat16)
    (p,) = write_output("bf", bf, tmp_path)
    assert p.suffix == ".pt" and torch.equal(torch.load(p, weights_only=True), bf)
    arr = np.arange(5, dtype=np.uint16)
    (p,) = write_output("arr", arr, tmp_path)
    assert np.array_equal(np.load(p), arr)


def test_latent_dict_output_round_trips(tmp_path):
    latent = {"samples": torch.randn(1, 4, 6, 5), "batch_index": [0], "noise_mask": torch.rand(1, 1, 6, 5)}
    paths = write_output("latent", latent, tmp_path)
    assert sorted(p.name for p in paths) == ["latent.json", "latent.safetensors"]
    assert json.loads((tmp_path / "latent.json").read_text()) == {"batch_index": [0]}
    back = load_input(tmp_path / "latent.safetensors")
    assert set(back) == set(latent) and back["batch_index"] == [0]
    assert torch.equal(back["samples"], latent["samples"]) and torch.equal(back["noise_mask"], latent["noise_mask"])
    only = {"samples": torch.zeros(1, 4, 2, 2)}
    (p,) = write_output("only", only, tmp_path)
    got = load_input(p)
    assert isinstance(got, dict) and torch.equal(got["samples"], only["samples"])  # a dict stays a dict


def test_plain_outputs(tmp_path):
    (p,) = write_output("text", "héllo ✓", tmp_path)
    assert p.name == "text.txt" and p.read_text(encoding="utf-8") == "héllo ✓"
    for key, value in [("n", 3), ("f", 2.5), ("b", True), ("none", None), ("l", [1, "a", None]),
                       ("d", {"a": {"b": [1.5]}})]:
        (p,) = write_output(key, value, tmp_path)
        assert p.suffix == ".json" and json.loads(p.read_text()) == value
    (p,) = write_output("t", (1, 2), tmp_path)
    assert json.loads(p.read_text()) == [1, 2]


def test_anything_else_is_pickled(tmp_path):
    import cloudpickle

    for key, value in [("c", 1 + 2j), ("s", {1, 2}), ("nan", float("nan")), ("k", {1: "int key"})]:
        (p,) = write_output(key, value, tmp_path)
        assert p.suffix == ".pkl"
        with open(p, "rb") as f:
            back = cloudpickle.load(f)
        assert back == value or (key == "nan" and back != back)


def test_output_names_are_safe_and_unique(tmp_path):
    written = write_outputs({"a/b": "x", "a b": "y", "../up": "z"}, tmp_path)
    names = {k: [p.name for p in v] for k, v in written.items()}
    assert names == {"a/b": ["a_b.txt"], "a b": ["a_b-2.txt"], "../up": ["up.txt"]}
    assert all(p.parent == tmp_path for v in written.values() for p in v)


# -------------------------------------------------------------------------------------- command


@pytest.mark.comfy
def test_run_command_inverts_a_png_in_process(inprocess, comfy_path, tmp_path, capsys):
    px = _pixels(3, 12, 17)
    Image.fromarray(px).save(tmp_path / "in.png")
    out = tmp_path / "out"
    rc = cli.main(["run", str(WORKFLOWS / "run_loop_invert.json"), "--iterations", "3",
                   "--input", f"image={tmp_path / 'in.png'}", "--output-dir", str(out),
                   "--comfyui", str(comfy_path), "--timeout", "120", "--progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["image_000.png"]
    with Image.open(out / "image_000.png") as im:
        assert np.array_equal(np.asarray(im), 255 - px)  # inverted three times
    assert "image_000.png" in captured.out and "1 file(s) written" in captured.out
    assert "3/3" in captured.err  # the progress bar reached the end


@pytest.mark.comfy
def test_run_command_through_the_server_over_http(server, tmp_path, capsys):
    px = _pixels(4, 6, 7)
    Image.fromarray(px).save(tmp_path / "in.png")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rc = cli.main(["run", str(WORKFLOWS / "run_loop_invert.json"), str(WORKFLOWS / "run_loop_invert.json"),
                       "-i", f"image={tmp_path / 'in.png'}", "-o", str(out), "--server", server.url,
                       "--transport", "http", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert any("over HTTP" in str(w.message) for w in seen)
    with Image.open(out / "image_000.png") as im:
        assert np.array_equal(np.asarray(im), px)  # inverted twice


@pytest.mark.comfy
def test_run_command_errors_are_one_line(inprocess, comfy_path, tmp_path, capsys):
    rc = cli.main(["run", str(WORKFLOWS / "run_loop_invert.json"), "-o", str(tmp_path),
                   "--comfyui", str(comfy_path), "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "discomfort run: error:" in err and "'image'" in err
    rc = cli.main(["run", str(tmp_path / "missing.json"), "-o", str(tmp_path), "--comfyui", str(comfy_path)])
    assert rc == 1 and "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "x.json", "-o", str(tmp_path), "--server", "http://x", "--comfyui", "y"])


@pytest.mark.comfy
def test_run_command_until_a_key(server, tmp_path, capsys):
    """``--until KEY`` without ``--iterations``: as many iterations as it takes."""
    port = lambda uid, src=None: {"class_type": "DiscomfortPort",  # noqa: E731
                                  "inputs": {"unique_id": uid, **({"input_data": src} if src else {})}}
    workflow = {
        "1": port("image"),
        "2": {"class_type": "EmptyImage", "inputs": {"width": 6, "height": 5, "batch_size": 1, "color": 0xFFFFFF}},
        "3": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["2", 0], "blend_factor": 0.5,
                                                     "blend_mode": "normal"}},
        "4": port("image", ["3", 0]),
        "5": {"class_type": "DiscomfortTestMeanAbove", "inputs": {"image": ["3", 0], "threshold": 0.9}},
        "6": port("bright", ["5", 0]),
    }
    (tmp_path / "brighten.json").write_text(json.dumps(workflow))
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(tmp_path / "black.png")
    rc = cli.main(["run", str(tmp_path / "brighten.json"), "-i", f"image={tmp_path / 'black.png'}",
                   "-o", str(tmp_path / "out"), "--server", server.url, "--until", "bright", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "4 iteration(s): bright was true" in captured.out  # 1 - 0.5**4 > 0.9 first at 4
    with Image.open(tmp_path / "out" / "image_000.png") as im:
        assert np.asarray(im).min() == round(255 * (1 - 0.5 ** 4))


# ------------------------------------------------------------------ loops: --keep, --set, --input-dir


def _discomfort(*args: str) -> "subprocess.CompletedProcess":
    import subprocess

    return subprocess.run([sys.executable, "-m", "discomfort.cli", "run", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.comfy
def test_run_command_keeps_every_iteration_and_sets_widgets(server, tmp_path):
    """A subprocess: --keep writes each iteration's image, --set changes a widget by node title (no
    port needed), the seed control increments between iterations; --controls fixed stops it."""
    from test_loops import noise_prompt, noise_workflow

    (tmp_path / "noise.json").write_text(json.dumps(noise_workflow(5, "increment", prefix="cli_keep")))
    out = tmp_path / "out"
    done = _discomfort(str(tmp_path / "noise.json"), "-n", "3", "--keep", "noisy", "--set", "Noise.seed=70",
                       "--set", "Noise.strength=0.25", "-o", str(out), "--server", server.url, "--no-progress")
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["noisy_000.png", "noisy_it001_000.png", "noisy_it002_000.png", "noisy_it003_000.png"]
    assert "noisy (iteration 3)" in done.stdout and "4 file(s) written" in done.stdout
    saved = [line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("saved by node 4: ")]
    assert len(saved) == 3  # SaveImage's file of each iteration, named (a server given by URL: its folder's)
    assert all(s.endswith(" (in the server's output folder)") for s in saved)
    assert all((server.output_dir / s.split(" ")[0]).is_file() for s in saved)

    # iteration 2 used seed 71 at strength 0.25: the same image as the API prompt that says so
    api = noise_prompt(71)
    api["2"]["inputs"]["strength"] = 0.25
    (tmp_path / "api.json").write_text(json.dumps(api))
    one = _discomfort(str(tmp_path / "api.json"), "-o", str(tmp_path / "one"), "--server", server.url,
                      "--no-progress")
    assert one.returncode == 0, one.stderr
    with Image.open(out / "noisy_it002_000.png") as a, Image.open(tmp_path / "one" / "noisy_000.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with Image.open(out / "noisy_it001_000.png") as a:
        assert not np.array_equal(np.asarray(a), np.asarray(Image.open(tmp_path / "one" / "noisy_000.png")))

    fixed = _discomfort(str(tmp_path / "noise.json"), "-n", "2", "--keep", "noisy", "--controls", "fixed",
                        "-o", str(tmp_path / "fixed"), "--server", server.url, "--no-progress")
    assert fixed.returncode == 0, fixed.stderr
    with Image.open(tmp_path / "fixed" / "noisy_it001_000.png") as a, \
            Image.open(tmp_path / "fixed" / "noisy_it002_000.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.comfy
def test_run_command_runs_once_per_file_of_an_input_dir(server, tmp_path):
    """--input-dir image=DIR: one run per file, its outputs in OUT/<file name>/."""
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = {name: _pixels(i, 5, 6) for i, name in enumerate(["a", "b", "c"])}
    for name, px in pixels.items():
        Image.fromarray(px).save(photos / f"{name}.png")
    (photos / "notes.md").write_text("not an input")
    out = tmp_path / "out"
    done = _discomfort(str(WORKFLOWS / "run_loop_invert.json"), "--input-dir", f"image={photos}", "-o", str(out),
                       "--server", server.url, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c"]
    for name, px in pixels.items():
        with Image.open(out / name / "image_000.png") as im:
            assert np.array_equal(np.asarray(im), 255 - px)


@pytest.mark.comfy
def test_run_command_loop_flags_fail_in_one_line(server, tmp_path, capsys):
    from test_loops import noise_workflow

    (tmp_path / "noise.json").write_text(json.dumps(noise_workflow()))
    (tmp_path / "empty").mkdir()
    cases = [(["--set", "Sampler.seed=1"], "no node with id or title 'Sampler'"),
             (["--set", "Noise.steps=1"], "node 2 (ImageAddNoise) has no input 'steps'"),
             (["--set", "Noise.image=1"], "is linked to node 1"),
             (["--set", "seed=1"], "expected NODE.INPUT=VALUE"),
             (["--keep", "nope"], "keep= names 'nope'"),
             (["--input-dir", f"image={tmp_path / 'empty'}"], "no input files"),
             (["--input-dir", f"image={tmp_path / 'none'}"], "no such folder")]
    for extra, message in cases:
        rc = cli.main(["run", str(tmp_path / "noise.json"), *extra, "-o", str(tmp_path / "out"), "--server",
                       server.url, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 1 and message in err and err.count("\n") == 1, (extra, err)
