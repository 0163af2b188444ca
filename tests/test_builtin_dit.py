"""The shipped DiT: loads with safetensors, and ComfyUI's own Flux classes sample the same digits from the same
weights, noise and sampler as the standalone diffusers transformer (``reuse_bench.builtin_dit``)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from comfy_harness import NOT_IN_THIS_ENVIRONMENT, running_version

from reuse_bench import builtin_dit as bd
from reuse_bench.digit_classifier import load_classifier

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason=f"diffusers {NOT_IN_THIS_ENVIRONMENT}")

LABELS = tuple(range(10))
SEEDS = tuple(range(200, 210))  # not the bench's seeds, not the recorded evaluation's
STEPS = 12  # fewer than the default keeps the test quick; agreement does not depend on the count
# fp32 on CPU: diffusers and ComfyUI apply RoPE, attention and the adaLN modulation with different (equivalent)
# formulas, so the images differ by rounding only: measured 3.5e-6 (ComfyUI 0.3.64) and 1.1e-5 (0.33.0) on images
# of magnitude up to 1.2 (24 steps, docs/builtin-models.md).
TOLERANCE = 1e-4


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_mnist_dit"):
        bd.load_conditioning(tmp_path / "absent.safetensors")


def test_packing_is_flux_packing_and_round_trips():
    x = torch.arange(2 * 32 * 32, dtype=torch.float32).view(2, 1, 32, 32)
    tokens = bd.pack(x)
    assert tokens.shape == (2, 256, 4)
    # token 1 is the patch at rows 0-1, columns 2-3, its values in row-major order within the patch
    assert tokens[0, 1].tolist() == [2.0, 3.0, 34.0, 35.0]
    assert torch.equal(bd.unpack(tokens), x)


def test_record_matches_the_code():
    record = json.loads(bd.CONFIG_PATH.read_text())
    assert record["transformer_config"] == bd.TRANSFORMER_CONFIG
    assert record["conditioning"]["text_tokens"] == bd.TEXT_TOKENS
    assert record["training"]["steps"] > 0 and record["training"]["seed"] == 0
    assert bd.WEIGHTS_PATH.stat().st_size < 4 * 2**20
    heads, head_dim = bd.TRANSFORMER_CONFIG["num_attention_heads"], bd.TRANSFORMER_CONFIG["attention_head_dim"]
    assert sum(bd.TRANSFORMER_CONFIG["axes_dims_rope"]) == head_dim
    assert bd.COMFY_UNET_CONFIG["hidden_size"] == heads * head_dim


@needs_diffusers
def test_diffusers_model_matches_its_record():
    model = bd.load_builtin_dit()
    record = json.loads(bd.CONFIG_PATH.read_text())
    parameters = sum(p.numel() for p in model.transformer.parameters())
    parameters += sum(p.numel() for p in model.conditioning.parameters())
    assert parameters == record["parameters"]
    assert not model.transformer.training


@pytest.fixture(scope="module")
def comfy_dit(comfy):
    return bd.load_comfy_model()


def test_comfyui_runs_the_weights_through_its_own_flux(comfy_dit):
    import comfy.ldm.flux.model
    import comfy.model_base

    assert isinstance(comfy_dit.model, comfy.model_base.Flux)
    assert type(comfy_dit.model.diffusion_model) is comfy.ldm.flux.model.Flux
    assert comfy_dit.model.latent_format.latent_channels == 1
    assert comfy_dit.model.model_sampling.sigma(torch.tensor(0.3)).item() == pytest.approx(0.3)  # shift 1: no warp


@pytest.fixture(scope="module")
def comfy_images(comfy_dit):
    return bd.sample_comfy(comfy_dit, LABELS, SEEDS, STEPS)


@needs_diffusers
def test_comfyui_and_diffusers_give_the_same_sample(comfy_images):
    from reuse_bench.sampling_dit import DiTSampleSpec, sample_dit

    reference = sample_dit(bd.load_builtin_dit(), DiTSampleSpec(LABELS, SEEDS, STEPS))
    assert reference.abs().max() > 0.5  # real digits, not a degenerate all-zero output
    torch.testing.assert_close(comfy_images, reference, rtol=0, atol=TOLERANCE)


def test_comfyui_samples_are_the_requested_digits(comfy_images):
    # Runs on every ComfyUI version, also where diffusers is not installed (ComfyUI 0.33's environment): the
    # classifier needs only torch. The shipped record's full-compute rate is the expectation; 10 images allow
    # for some misses.
    record = json.loads(bd.CONFIG_PATH.read_text())["full_compute_class_accuracy"]
    hits = (load_classifier().predict(comfy_images) == torch.tensor(LABELS)).float().mean().item()
    assert hits >= min(record["accuracy"], 0.9) - 0.2, f"ComfyUI {running_version()}: {hits:.0%} recognised"


@needs_diffusers
def test_every_dit_bench_method_runs_and_leaves_the_model_as_it_was():
    from reuse_bench import methods_dit as MD
    from reuse_bench.sampling_dit import DiTSampleSpec, sample_dit
    from reuse_core.key_steps import KeyStepSpec
    from reuse_core.schedules import hurry

    model = bd.load_builtin_dit()
    steps = 8
    spec = DiTSampleSpec((3, 7), (300, 301), steps)
    reference = sample_dit(model, spec)
    skipping = [
        MD.encoder_method("paper", steps, KeyStepSpec("paper"), parallel=True),
        MD.encoder_method("uniform", steps, KeyStepSpec("uniform", k=2), parallel=False),
        MD.attention_method("HURRY", steps, hurry(steps, 4), "map"),
        MD.attention_method("HURRY", steps, hurry(steps, 4), "output"),
        MD.first_block_cache(steps, 10.0),  # a threshold nothing exceeds: every step after the first is cached
    ]
    adaptive = MD.peer_methods(steps)  # First Block Cache and PAB decide from the run: they may skip nothing
    for method in skipping + adaptive:
        predictor = method.make(model)
        images = sample_dit(model, spec, predictor)
        assert torch.isfinite(images).all() and predictor.note, method.name
        if method in skipping:
            assert not torch.equal(images, reference), method.name
        assert torch.equal(sample_dit(model, spec), reference), f"{method.name} left state in the model"
        if method is skipping[-1]:
            assert predictor.note == f"blocks 2-6 skipped at {steps - 1}/{steps} steps"


@needs_diffusers
@pytest.mark.parametrize("parallel", [True, False])
def test_encoder_propagation_in_comfyui_matches_the_diffusers_host(comfy_dit, parallel):
    """The node on ComfyUI's Flux (block replacement, the call tiled for parallel decoding) and the diffusers host
    (``DiffusersFluxHost``) with the same key steps and split (the default: 4 of 6 blocks) sample the same images."""
    from comfy_harness import node_inputs, pack_node

    from reuse_bench import methods_dit as MD
    from reuse_bench.sampling_dit import DiTSampleSpec, sample_dit
    from reuse_core.key_steps import KeyStepSpec

    steps = 12
    spec = DiTSampleSpec(LABELS[:4], SEEDS[:4], steps)
    model = bd.load_builtin_dit()
    method = MD.encoder_method("paper", steps, KeyStepSpec("paper"), parallel=parallel)
    standalone = sample_dit(model, spec, method.make(model))
    node = pack_node("EncoderFeaturePropagation")
    patched = node.execute(model=comfy_dit, **node_inputs(node, parallel_decoding=parallel)).result[0]
    in_comfy = bd.sample_comfy(patched, spec.labels, spec.seeds, steps)
    torch.testing.assert_close(in_comfy, standalone, rtol=0, atol=TOLERANCE)
    assert (standalone - sample_dit(model, spec)).abs().max() > 1e-2, "the paper preset must reuse"
