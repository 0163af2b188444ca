"""Attention Map Reuse on the DiT families people run, each a tiny real model built from ComfyUI's own classes
(``tests/tiny_dits.py``), sampled with ``comfy.sample.sample``.

Per family: 0 reuse steps is bit-identical to the unpatched model (and every attention call went through the
hook); the node's defaults (phast, map) and output mode with 3 of 6 steps reused really reuse, stay finite and
close to the unpatched result without equalling it. Families whose attention bypasses the hook are refused by
name. A family the running ComfyUI lacks skips with the version and the family.
"""

import comfy_harness as h
import pytest
import tiny_dits
import torch

from reuse_core.metrics import psnr

STEPS = 6
REUSE = 3  # half the steps, as the node's default 10 of the paper's 20


@pytest.fixture(scope="module")
def node(comfy):
    return h.pack_node("AttentionMapReuse")


@pytest.fixture(scope="module")
def reference(comfy):
    return tiny_dits.References(STEPS)


def run(dit, model):
    return tiny_dits.sample(dit, model, STEPS)


def patched(node, model, **overrides):
    return node.execute(model=model, **h.node_inputs(node, **overrides)).result[0]


@pytest.mark.parametrize("family", list(tiny_dits.FAMILIES))
def test_zero_reuse_is_bit_identical(comfy, node, reference, runs, family):
    dit, full = reference(family)
    mro = [cls.__name__ for cls in type(dit.patcher.model.diffusion_model).__mro__]
    assert tiny_dits.FAMILIES[family].diffusion_model in mro
    assert torch.isfinite(full).all()
    zero = run(dit, patched(node, dit.patcher, reuse_steps=0))
    stats = runs.one()
    assert stats.reused_steps == 0 and stats.steps == STEPS, stats
    assert stats.layers > 0, "no attention call of this family reached the hook"
    assert torch.equal(zero, full), "zero reuse must be bit-identical to the unpatched model"


@pytest.mark.parametrize("mode", ["map", "output"])
@pytest.mark.parametrize("family", list(tiny_dits.FAMILIES))
def test_reuse(comfy, node, reference, runs, family, mode):
    """``map``: the node's defaults (phast schedule, map mode, both attentions); ``output``: output mode."""
    dit, full = reference(family)
    overrides = {"reuse_steps": REUSE} if mode == "map" else {"reuse_steps": REUSE, "mode": "output"}
    out = run(dit, patched(node, dit.patcher, **overrides))
    stats = runs.last()
    assert stats.reused_steps == REUSE and stats.calls_reused > 0, stats
    assert torch.isfinite(out).all()
    assert not torch.equal(out, full)
    assert psnr(out, full) > 20.0
    assert torch.equal(run(dit, dit.patcher), full), "the input MODEL must be unchanged by a patched run"


@pytest.mark.parametrize("family", list(tiny_dits.REFUSED))
def test_family_whose_attention_bypasses_the_hook_is_refused(comfy, node, family):
    dit = tiny_dits.build(family)
    name = tiny_dits.REFUSED[family].diffusion_model
    assert type(dit.patcher.model.diffusion_model).__name__ == name

    # The reason: a sampler run of it never calls an installed optimized_attention_override.
    calls = []

    def counting_override(func, *args, **kwargs):
        calls.append(1)
        return func(*args, **kwargs)

    probe = dit.patcher.clone()
    probe.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = counting_override
    assert torch.isfinite(run(dit, probe)).all()
    assert calls == []

    options_before = repr(dit.patcher.model_options)
    with pytest.raises(ValueError, match=f"cannot patch {name}: its attention does not go through"):
        patched(node, dit.patcher)
    assert repr(dit.patcher.model_options) == options_before
