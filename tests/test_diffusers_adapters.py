"""The diffusers adapters drive the reuse_core engines on a real (tiny, random) UNet2DConditionModel."""

from __future__ import annotations

import pytest
import torch
from comfy_harness import NOT_IN_THIS_ENVIRONMENT

diffusers = pytest.importorskip("diffusers", reason=f"diffusers {NOT_IN_THIS_ENVIRONMENT}")

from reuse_core.adapters.diffusers_attention import DiffusersAttentionReuse, ReuseAttnProcessor  # noqa: E402
from reuse_core.adapters.diffusers_encoder import DiffusersUNetHost  # noqa: E402
from reuse_core.attention_engine import AttentionReuseConfig  # noqa: E402
from reuse_core.encoder_engine import EncoderPropagationEngine  # noqa: E402
from reuse_core.key_steps import KeyStepSpec, make_plan  # noqa: E402
from reuse_core.schedules import ReuseSchedule, hurry  # noqa: E402
from reuse_core.steps import StepMatch  # noqa: E402

STEPS = 6
TIMESTEPS = torch.linspace(900, 50, STEPS).round()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
    )
    return model.eval().requires_grad_(False)


def inputs(batch=2):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, 16, 16, generator=gen), torch.randn(batch, 3, 8, generator=gen)


def loop(unet, predict):
    """A toy sampler: feeds each step's output back, so a deviation at any step shows in the result."""
    x, ctx = inputs()
    outs = []
    with torch.no_grad():
        for i, t in enumerate(TIMESTEPS):
            eps = predict(i, x, t, ctx)
            outs.append(eps)
            x = x - 0.1 * eps
    return x, outs


def plain(unet):
    return lambda i, x, t, ctx: unet(x, t, encoder_hidden_states=ctx).sample


def test_attention_adapter_without_reuse_is_bit_identical(unet):
    reference, _ = loop(unet, plain(unet))
    adapter = DiffusersAttentionReuse(unet, AttentionReuseConfig(mode="map"), hurry(STEPS, 0))
    with adapter:
        assert all(isinstance(p, ReuseAttnProcessor) for p in unet.attn_processors.values())

        def predict(i, x, t, ctx):
            adapter.set_step(i)
            return unet(x, t, encoder_hidden_states=ctx).sample

        patched, _ = loop(unet, predict)
    assert torch.equal(patched, reference)
    assert not any(isinstance(p, ReuseAttnProcessor) for p in unet.attn_processors.values())  # restored


@pytest.mark.parametrize("mode", ["map", "output"])
def test_attention_adapter_reuses_calls_and_stays_close(unet, mode):
    _, ref_steps = loop(unet, plain(unet))
    schedule = ReuseSchedule((1, 1, 1, 0, 1, 0))
    adapter = DiffusersAttentionReuse(unet, AttentionReuseConfig(mode=mode), schedule)
    adapter.track_timesteps(TIMESTEPS)  # the step comes from the timestep each call receives
    with adapter:
        patched, steps = loop(unet, plain(unet))
        stats = adapter.run.stats
        assert stats.reused == 2 * len(unet.attn_processors)  # 2 reuse steps x every attention layer
        assert stats.steps_reused == {3, 5}
        assert stats.fallbacks == 0
    # Steps 0-1 run the fused kernel as unpatched; step 2 keeps its maps (explicit softmax: equal up to rounding);
    # reuse step 3 changes the output, but not by much.
    for i in range(2):
        assert torch.equal(steps[i], ref_steps[i])
    torch.testing.assert_close(steps[2], ref_steps[2], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(steps[3], ref_steps[3], rtol=1e-4, atol=1e-5)
    assert (steps[3] - ref_steps[3]).abs().max() < 0.5
    assert torch.isfinite(patched).all()


def test_attention_adapter_refuses_a_non_diffusers_model():
    with pytest.raises(TypeError, match="attention processors"):
        DiffusersAttentionReuse(torch.nn.Linear(2, 2), AttentionReuseConfig(), hurry(4, 1))


def encoder_predict(unet, spec, parallel, seen=None):
    host = DiffusersUNetHost(unet)
    engine = EncoderPropagationEngine(make_plan(spec, STEPS, max_batch=4), TIMESTEPS.tolist(), parallel=parallel)

    def predict(i, x, t, ctx):
        return engine.predict(host, x, t.expand(x.shape[0]), ctx, step=StepMatch(i, True), cache_key="cfg")

    return engine, predict


def test_encoder_host_with_every_step_a_key_step_is_bit_identical(unet):
    reference, _ = loop(unet, plain(unet))
    engine, predict = encoder_predict(unet, KeyStepSpec("uniform", k=1), parallel=True)
    patched, _ = loop(unet, predict)
    assert torch.equal(patched, reference)
    assert engine.stats.encoder_passes_saved == 0


def test_encoder_host_encode_then_decode_equals_its_full_forward_and_the_native_unet(unet):
    host = DiffusersUNetHost(unet)
    x, ctx = inputs()
    t = TIMESTEPS[2].expand(x.shape[0])
    with torch.no_grad():
        native = unet(x, t, encoder_hidden_states=ctx).sample
        features = host.encode(x, t, ctx)
        out, captured = host.full_forward(x, t, ctx, capture=True)
        assert host.full_forward(x, t, ctx, capture=False)[1] is None
        assert torch.equal(host.decode(features, t, ctx), native) and torch.equal(out, native)
    assert all(torch.equal(a, b) for a, b in zip(captured.skips, features.skips, strict=True))
    assert torch.equal(captured.middle, features.middle)


@pytest.mark.parametrize("parallel", [False, True])
def test_encoder_host_saves_encoder_passes(unet, parallel):
    _, ref_steps = loop(unet, plain(unet))
    engine, predict = encoder_predict(unet, KeyStepSpec("uniform", k=3), parallel=parallel)
    patched, steps = loop(unet, predict)
    assert engine.stats.full_steps == {0, 3}
    assert engine.stats.encoder_passes_saved == 4
    assert engine.stats.decoder_batches == (2 if parallel else 4)
    assert torch.equal(steps[0], ref_steps[0])
    assert not torch.equal(steps[1], ref_steps[1])
    assert torch.isfinite(patched).all()


def test_parallel_and_sequential_decoding_agree(unet):
    _, sequential = loop(unet, encoder_predict(unet, KeyStepSpec("uniform", k=3), parallel=False)[1])
    _, batched = loop(unet, encoder_predict(unet, KeyStepSpec("uniform", k=3), parallel=True)[1])
    for a, b in zip(sequential, batched, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_encoder_host_rejects_unsupported_inputs(unet):
    host = DiffusersUNetHost(unet)
    x, ctx = inputs()
    with pytest.raises(ValueError, match="unsupported U-Net inputs"):
        host.encode(x, torch.full((2,), 10.0), ctx, attention_mask=torch.ones(2, 3))
