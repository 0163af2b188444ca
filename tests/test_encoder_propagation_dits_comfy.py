"""Encoder Feature Propagation on diffusion transformers, each a tiny real model built from ComfyUI's own classes
(``tests/tiny_dits.py``), sampled with ``comfy.sample.sample``.

Per family: every step a key step is bit-identical to the unpatched model; parallel decoding equals sequential;
reuse really skips encoder passes; a decoder-only pass on the state its own full pass cached reproduces that pass
(the cache holds everything the remaining blocks read, for splits in double- and single-stream blocks).
Families without a usable mechanism are refused by name. A family the running ComfyUI lacks skips with the version.
"""

import importlib

import comfy_harness as h
import pytest
import tiny_dits
import torch
from run_records import ENCODER

from reuse_core.metrics import psnr

STEPS = 6
# From the one families table: the tiny models whose class Encoder Feature Propagation splits, and those it refuses.
BY_CLASS = h.pack_families().BY_CLASS
FAMILIES = [name for name, f in tiny_dits.FAMILIES.items() if BY_CLASS[f.diffusion_model].stacks]
REFUSED = [name for name, f in tiny_dits.FAMILIES.items() if not BY_CLASS[f.diffusion_model].stacks]


@pytest.fixture(scope="module")
def efp(comfy):
    h.load_pack()
    return importlib.import_module("comfyui_reuse.nodes.encoder_hooks")


@pytest.fixture(scope="module")
def node(comfy):
    return h.pack_node("EncoderFeaturePropagation")


@pytest.fixture(scope="module")
def reference(comfy):
    references = tiny_dits.References(STEPS)
    yield references
    references.cache.clear()


def run(dit, model):
    return tiny_dits.sample(dit, model, STEPS)


def rel_diff(a, b):
    return float((a - b).norm() / b.norm())


def patched(node, model, **overrides):
    return node.execute(model=model, **h.node_inputs(node, **overrides)).result[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_step_a_key_step_is_bit_identical(comfy, node, reference, runs, family):
    dit, full = reference(family)
    assert torch.isfinite(full).all()
    out = run(dit, patched(node, dit.patcher, key_steps="uniform", uniform_k=1))
    stats = runs.last(ENCODER)
    assert stats.model_calls > 0 and stats.encoder_passes_saved == 0, stats
    assert torch.equal(out, full)


@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_equals_sequential_and_skips_the_encoder(comfy, node, reference, runs, family):
    dit, full = reference(family)
    settings = dict(key_steps="uniform", uniform_k=3)
    parallel = run(dit, patched(node, dit.patcher, **settings))
    stats = runs.last(ENCODER)
    assert stats.key_steps == (0, 3), stats
    assert stats.encoder_passes_saved == 4 and stats.largest_batch == 2, stats  # cond + uncond in one call
    sequential = run(dit, patched(node, dit.patcher, parallel_decoding=False, **settings))
    assert runs.last(ENCODER).largest_batch == 1
    assert torch.isfinite(parallel).all()
    assert rel_diff(parallel, sequential) <= 1e-4
    assert not torch.equal(parallel, full), "decoder-only steps must change the output of a random model"
    assert psnr(parallel, full) > 10.0
    assert torch.equal(run(dit, dit.patcher), full), "the input MODEL must be unchanged by a patched run"


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "dpmpp_2s_ancestral"])
def test_other_samplers_parallel_equals_sequential(comfy, node, runs, sampler):
    """Multi-evaluation and multistep samplers on a transformer: intermediate evaluations decode at their own
    timestep and never enter a parallel batch."""
    dit = tiny_dits.build("flux")
    outs = []
    for parallel in (True, False):
        model = patched(node, dit.patcher, key_steps="uniform", uniform_k=3, parallel_decoding=parallel)
        outs.append(tiny_dits.sample(dit, model, STEPS, sampler=sampler))
        assert runs.last(ENCODER).encoder_passes_saved > 0
    assert torch.isfinite(outs[0]).all()
    assert rel_diff(outs[0], outs[1]) <= 1e-4


def _decode_checks(efp, dit, fraction):
    """Inside a real sampler call: the full pass with capture, a decoder-only pass on its own cache (at the
    same timestep, alone and as a 2-step parallel batch) -> (full, decoded, batched, features)."""
    dit_host = importlib.import_module("comfyui_reuse.nodes.dit_host")
    import comfy.patcher_extension

    seen = {}

    def wrapper(executor, *args, **kwargs):
        net = executor.class_obj
        if "full" not in seen:
            split = dit_host.BlockSplit.of(net, fraction)
            host = dit_host.ComfyDiTHost(executor, net, split, args, kwargs)
            full, features = host.full_forward(host.x, host.timesteps, None, capture=True)
            seen.update(full=full, features=features, split=split)
            seen["decoded"] = host.decode(features, host.timesteps, None)
            seen["batched"] = host.decode(features.tile(2), torch.cat([host.timesteps] * 2), None)
        return executor(*args, **kwargs)

    model = dit.patcher.clone()
    for name, patch in dit_host.object_patches(model.get_model_object("diffusion_model")).items():
        model.add_object_patch(name, patch)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test", wrapper)
    h.sample(model, steps=2, cfg=1.0, latent=dit.latent.clone(), positive=dit.positive, negative=dit.negative)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_only_pass_on_its_own_cache_reproduces_the_full_pass(comfy, efp, family):
    dit = tiny_dits.build(family)
    seen = _decode_checks(efp, dit, 0.64)
    assert seen["features"] is not None, "the split block never ran"
    assert torch.equal(seen["decoded"], seen["full"])
    rows = seen["full"].shape[0]
    for chunk in seen["batched"].split(rows):
        assert (chunk - seen["full"]).abs().max() <= 1e-5


@pytest.mark.parametrize(("fraction", "blocks", "streams"), [(0.34, 1, {"txt"}), (0.64, 2, set())])
def test_flux_split_in_double_blocks_caches_both_streams(comfy, efp, fraction, blocks, streams):
    """Flux.1 here has 1 double + 2 single blocks: after the double block the text stream is separate state the
    remaining blocks read; inside the single blocks text and image tokens are one sequence."""
    seen = _decode_checks(efp, tiny_dits.build("flux"), fraction)
    assert seen["split"].encoder_blocks == blocks
    assert set(seen["features"].streams) == streams
    assert torch.equal(seen["decoded"], seen["full"])


def test_log_line_names_the_split(comfy, node, reference, caplog):
    dit, _ = reference("flux")
    with caplog.at_level("INFO"):
        run(dit, patched(node, dit.patcher, encoder_fraction=0.34))
    assert "encoder = first 1 of 3 blocks" in caplog.text


def test_chained_with_attention_reuse_keys_decoder_layers_apart(comfy, node, reference, runs):
    """A decoder-only pass makes fewer attention calls than a full forward; its layers must not take the full
    forward's ordinals (they would reuse another layer's attention)."""
    dit, full = reference("flux")
    attention = h.pack_node("AttentionMapReuse")
    model = patched(node, dit.patcher, key_steps="uniform", uniform_k=2)
    model = attention.execute(model=model, **h.node_inputs(attention, reuse_steps=3)).result[0]
    out = run(dit, model)
    assert torch.isfinite(out).all() and psnr(out, full) > 10.0
    # 3 blocks, 1 attention call each; the decoder-only passes run the last block only: its own 4th key.
    layers = runs.last().stats.layers
    assert len(layers) == 4 and ("decoder", 0) in layers, layers


@pytest.mark.parametrize("family", REFUSED)
def test_family_without_a_split_mechanism_is_refused(comfy, node, family):
    dit = tiny_dits.build(family)
    name = type(dit.patcher.model.diffusion_model).__name__
    with pytest.raises(ValueError, match=f"Encoder Feature Propagation cannot split .*{name}"):
        patched(node, dit.patcher)


def test_prior_noise_injection_is_refused_on_flow_models(comfy, node, reference):
    dit, _ = reference("flux")
    with pytest.raises(ValueError, match=r"noise_alpha > 0 .* needs a discrete"):
        run(dit, patched(node, dit.patcher, noise_alpha=0.003))
