"""A real architecture for the tests and the benchmark: an SD1.5-shaped checkpoint and LoRA with
random weights (built once, cached beside the test ComfyUI), and its load + sample loop.

* ``LOAD``: CheckpointLoaderSimple -> LoraLoader -> ports ``model``, ``clip``, ``vae`` (references).
* ``SAMPLE``: ports in -> CLIPTextEncode x2 -> KSampler (4 steps) -> VAEDecode -> ports ``latent``
  (fed back as the next iteration's input) and ``image``.
* ``single_prompt(n)``: the same n iterations as one prompt (n KSamplers in a chain).

Run as a script (``python _real_models.py COMFYUI OUT_DIR``) it runs the loop and the single prompt
in ComfyUI in this process (a fresh process: ComfyUI loads once per process) and writes the
results to OUT_DIR (``loop.npz``, ``single.npz``, ``report.json``).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _sd15_checkpoint import BUILD, CHECKPOINT, LORA  # noqa: E402

NODE_PACK = HERE.parents[1] / "comfy_nodes"
PROBE_PACK = HERE / "probe_pack"
WATCHED = ("CheckpointLoaderSimple", "LoraLoader", "CLIPTextEncode")
ITERATIONS, STEPS, SIZE, SEED = 3, 4, 64, 1066


def models_dir(comfy_path: Path) -> Path:
    """Where the built models live: the cache directory that holds the test ComfyUI."""
    return Path(comfy_path).resolve().parent / "models" / BUILD


def ensure_models(comfy_path: Path, python: str = sys.executable) -> tuple[Path, float]:
    """The models' directory, built first when missing (one builder at a time); and the seconds
    the build took (0 when cached)."""
    out = models_dir(comfy_path)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "checkpoints" / CHECKPOINT).is_file() and (out / "loras" / LORA).is_file():
            return out, 0.0
        t0 = time.monotonic()
        subprocess.run([python, str(HERE / "_sd15_checkpoint.py"), str(comfy_path), str(out)], check=True,
                       timeout=900)
        return out, time.monotonic() - t0


def model_paths_config(models: Path, folder: Path) -> Path:
    """An extra_model_paths.yaml (JSON is YAML) pointing ComfyUI's checkpoints and loras there."""
    config = folder / "sd15_model_paths.yaml"
    config.write_text(json.dumps({"sd15_random": {"base_path": str(models), "checkpoints": "checkpoints",
                                                  "loras": "loras"}}))
    return config


def _port(uid: str, source: list | None = None) -> dict:
    inputs: dict = {"unique_id": uid}
    if source is not None:
        inputs["input_data"] = source
    return {"class_type": "DiscomfortPort", "inputs": inputs}


def _ksampler(model: list, positive: list, negative: list, latent: list) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": model, "positive": positive, "negative": negative, "latent_image": latent, "seed": SEED,
        "steps": STEPS, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}


def _loaders() -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": LORA,
                                                     "strength_model": 0.8, "strength_clip": 0.8}},
    }


def _encoders(clip: list) -> dict:
    return {
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a lighthouse at dusk"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "blurry"}},
    }


LOAD = {**_loaders(), "3": _port("model", ["2", 0]), "4": _port("clip", ["2", 1]), "5": _port("vae", ["1", 2])}

SAMPLE = {
    "1": _port("model"), "2": _port("clip"), "3": _port("vae"), "4": _port("latent"),
    **_encoders(["2", 0]),
    "7": _ksampler(["1", 0], ["5", 0], ["6", 0], ["4", 0]),
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}},
    "9": _port("latent", ["7", 0]),
    "10": _port("image", ["8", 0]),
}


def single_prompt(iterations: int = ITERATIONS) -> dict:
    """The loop's computation as one prompt: one load, one encoding, then per iteration a sampler
    (the chain) and a decode (ports ``image_1``...; the last one's is ``image``)."""
    prompt = {**_loaders(), **_encoders(["2", 1]),
              "7": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}}
    latent = ["7", 0]
    for i in range(iterations):
        sampler, decode, port = (str(100 + 3 * i + j) for j in range(3))
        prompt[sampler] = _ksampler(["2", 0], ["5", 0], ["6", 0], latent)
        latent = [sampler, 0]
        prompt[decode] = {"class_type": "VAEDecode", "inputs": {"samples": latent, "vae": ["1", 2]}}
        prompt[port] = _port("image" if i == iterations - 1 else f"image_{i + 1}", [decode, 0])
    prompt["9"] = _port("latent", latent)
    return prompt


def first_latent():
    """What EmptyLatentImage gives the single prompt: the loop's first input."""
    import torch

    return {"samples": torch.zeros([1, 4, SIZE // 8, SIZE // 8])}


def calls(log: Path, pid: int | None = None) -> dict[str, int]:
    """How often each watched node ran, from the probe pack's log (of process ``pid``)."""
    out = dict.fromkeys(WATCHED, 0)
    if log.is_file():
        for line in log.read_text().splitlines():
            who, _, name = line.partition(" ")
            if pid is None or int(who) == pid:
                out[name] = out.get(name, 0) + 1
    return out


def minus(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def arrays(result) -> dict:
    return {"latent": result["latent"]["samples"].numpy(), "image": result["image"].numpy()}


def _inprocess(comfy_path: Path, out: Path) -> None:
    """The loop and the single prompt in ComfyUI in this process; results into ``out``."""
    import numpy as np

    from discomfort import Run, run_sequential
    from discomfort.comfy import InProcessComfy

    log = Path(os.environ["DISCOMFORT_PROBE_LOG"])
    models = models_dir(comfy_path)
    executor = InProcessComfy(comfy_path, isolated=True, custom_nodes=[NODE_PACK, PROBE_PACK])
    import folder_paths

    folder_paths.add_model_folder_path("checkpoints", str(models / "checkpoints"))
    folder_paths.add_model_folder_path("loras", str(models / "loras"))
    t0 = time.monotonic()
    with Run(executor) as run:
        # Only these: in process the references could come back too, and would keep the model alive.
        loop = run.execute([LOAD, SAMPLE], {"latent": first_latent()}, ITERATIONS, outputs=["latent", "image"])
    loop_seconds = time.monotonic() - t0
    import resource

    loop_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loop_calls = calls(log)
    executor.free()  # the loop's model goes before the single prompt loads its own
    import gc

    from comfy import model_management

    model_management.unload_all_models()
    gc.collect()
    t0 = time.monotonic()
    single = run_sequential(single_prompt(), executor=executor)
    single_seconds = time.monotonic() - t0
    np.savez(out / "loop.npz", **arrays(loop))
    np.savez(out / "single.npz", **arrays(single))
    (out / "report.json").write_text(json.dumps({
        "reused": loop.reused, "loop_calls": loop_calls, "single_calls": minus(calls(log), loop_calls),
        "loop_seconds": loop_seconds, "single_seconds": single_seconds, "loop_peak_rss": loop_peak,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    _inprocess(Path(sys.argv[1]), Path(sys.argv[2]))
