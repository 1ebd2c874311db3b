"""Builds a Stable Diffusion 1.5-shaped checkpoint and a small LoRA with random fp16 weights.

Run as ``python _sd15_checkpoint.py COMFYUI_DIR OUT_DIR``: the models are ComfyUI's own classes
(the SD1.5 UNet config ComfyUI detects, its CLIP-L text model, its KL autoencoder), built on the
meta device and saved in the layout ComfyUI's CheckpointLoaderSimple reads (about 1,066 M
parameters, 2.1 GB). The LoRA (rank 4) targets the UNet's attention projections and the text
encoder's, under the key names ComfyUI maps. Weights are seeded: the same files every time.
Written to OUT_DIR/checkpoints and OUT_DIR/loras through a temporary name, so a cut build
leaves nothing a test would take for a model.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

CHECKPOINT = "sd15_random_fp16.safetensors"
LORA = "sd15_random_lora.safetensors"
#: Bump when the files change: the cache directory is named after it.
BUILD = "sd15-random-v1"


def _fill(name: str, shape: tuple, gen, torch) -> "torch.Tensor":
    """Weights that keep activations finite: norms 1 and 0, everything else N(0, 0.02)."""
    if "norm" in name or "ln_" in name or "layer_norm" in name:
        return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=torch.float16)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float16)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.float16)


def build(comfy: Path, out: Path) -> None:
    sys.path.insert(0, str(comfy))
    from discomfort.comfy import _tvshim

    _tvshim.install()
    import comfy.options  # noqa: F401

    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import safetensors.torch
    import torch

    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.model_detection as detection
    import comfy.sd1_clip as sd1_clip

    t0 = time.monotonic()
    gen = torch.Generator().manual_seed(1066)
    unet_config = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                   "legacy": False, "adm_in_channels": None, "dtype": torch.float16, "in_channels": 4,
                   "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
                   "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
                   "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
                   "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                   "use_temporal_attention": False, "use_temporal_resblock": False}
    config = detection.model_config_from_unet_config(dict(unet_config))
    assert type(config).__name__ == "SD15", config
    with torch.device("meta"):
        model = config.get_model({}, device="meta")
        clip = sd1_clip.SD1ClipModel(device="meta", dtype=torch.float16)
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
        vae = autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    shapes = model.state_dict_for_saving(clip.state_dict(), vae.state_dict())
    tensors = {k: _fill(k, tuple(v.shape), gen, torch) for k, v in sorted(shapes.items())}
    params = sum(t.numel() for t in tensors.values())

    lora: dict = {}
    rank = 4
    for key, t in sorted(model.diffusion_model.state_dict().items()):
        if t.dim() == 2 and (".attn1.to_" in key or ".attn2.to_" in key) and key.endswith(".weight"):
            name = "lora_unet_" + key[:-len(".weight")].replace(".", "_")
            lora[name + ".lora_down.weight"] = _fill("down", (rank, t.shape[1]), gen, torch)
            lora[name + ".lora_up.weight"] = _fill("up", (t.shape[0], rank), gen, torch)
            lora[name + ".alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    for b in range(12):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            name = f"lora_te_text_model_encoder_layers_{b}_self_attn_{proj}"
            lora[name + ".lora_down.weight"] = _fill("down", (rank, 768), gen, torch)
            lora[name + ".lora_up.weight"] = _fill("up", (768, rank), gen, torch)
            lora[name + ".alpha"] = torch.tensor(float(rank), dtype=torch.float16)

    for sub, fname, sd in (("checkpoints", CHECKPOINT, tensors), ("loras", LORA, lora)):
        folder = out / sub
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{fname}.{os.getpid()}.part"
        safetensors.torch.save_file(sd, str(tmp))
        os.replace(tmp, folder / fname)
    print(f"built {params / 1e6:.0f} M parameters, {len(lora)} LoRA tensors in {time.monotonic() - t0:.1f}s",
          flush=True)


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
