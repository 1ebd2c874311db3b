"""Code that tests/test_distributed.py runs inside Ray workers on a chosen node.

A plain module (no pytest assertion rewriting); the test registers it with Ray's cloudpickle to be
sent by value, so workers do not need the tests folder on their path.
"""

from __future__ import annotations

import os

import ray


def lies_in_plasma(addr: int) -> bool:
    """Whether ``addr`` is in this process's mapping of Ray's shared-memory object store."""
    with open("/proc/self/maps") as fh:
        for line in fh:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return len(parts) > 5 and "plasma" in parts[5]
    return False


def sample_values(seed: int) -> dict:
    """Values of every kind a ComfyUI port carries, deterministic for ``seed``."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 32, 48, 3, generator=g)
    return {
        "image": image,
        "mask": torch.rand(2, 32, 48, generator=g),
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "strided": torch.arange(60, dtype=torch.int64).reshape(6, 10)[:, ::3],
        "empty": torch.empty(0, 4),
        "latent": {"samples": torch.randn(1, 4, 8, 8, generator=g), "batch_index": [0]},
        "conditioning": [[torch.randn(1, 7, 16, generator=g), {"pooled_output": torch.randn(1, 16, generator=g)}]],
        "array": np.arange(24, dtype=np.float64).reshape(4, 6) * (seed + 1),
        "text": f"héllo {seed} ✓",
        "count": seed,
    }


def same(a, b) -> bool:
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@ray.remote(num_cpus=0)
class Probe:
    """A process on one node that uses a Ray run the way a ComfyUI node does (get_context)."""

    def where(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def save_samples(self, run_id: str, seed: int) -> dict:
        import discomfort

        ctx = discomfort.get_context(run_id)
        return {k: ctx.save(k, v) for k, v in sample_values(seed).items()}

    def check_samples(self, run_id: str, seed: int) -> dict:
        """Load every sample saved by another node; exact, and zero-copy in this node's store?"""
        import discomfort

        ctx = discomfort.get_context(run_id)
        expected = sample_values(seed)
        loaded = {k: ctx.load(k) for k in expected}
        return {
            "exact": {k: same(expected[k], loaded[k]) for k in expected},
            "image_in_plasma": lies_in_plasma(loaded["image"].data_ptr()),
            "context": type(ctx).__name__,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def save(self, run_id: str, key: str, nbytes: int) -> int:
        import discomfort
        import torch

        return discomfort.get_context(run_id).save(key, torch.ones(nbytes // 4, dtype=torch.float32))

    def load_and_hold(self, run_id: str, key: str) -> float:
        import discomfort

        self.held = discomfort.get_context(run_id).load(key)
        return float(self.held.sum())

    def drop(self) -> None:
        self.held = None
        import gc

        gc.collect()

    def load_error(self, run_id: str, key: str) -> str:
        import discomfort

        try:
            discomfort.get_context(run_id).load(key)
        except Exception as exc:  # noqa: BLE001 - the test looks at what was raised
            return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        return "no error"
