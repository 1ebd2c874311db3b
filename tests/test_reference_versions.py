"""Saving by reference the very object a key holds by reference keeps the key's version (ComfyUI's
cache downstream of its loaders stays valid); anything saved by value gets a new version."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the values saved are torch tensors and modules")

from discomfort import WorkflowContext  # noqa: E402


def test_a_value_saved_again_gets_a_new_version():
    with WorkflowContext(ram_budget=1 << 24) as ctx:
        t = torch.zeros(4)
        first = ctx.save("t", t)
        t += 1  # changed in place: must never look unchanged
        assert ctx.save("t", t) != first
        model = torch.nn.Linear(2, 2)
        kept = ctx.save("m", model)
        assert ctx.info("m")["kind"] == "ref" and ctx.info("t")["kind"] == "value"
        assert ctx.save("m", model) == kept == ctx.info("m")["version"]
        assert ctx.save("m", torch.nn.Linear(2, 2)) != kept  # another object: a new version
        ctx.save("m", 3)
        assert ctx.save("m", model) != kept  # held a value in between
