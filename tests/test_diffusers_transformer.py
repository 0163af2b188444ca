"""The diffusers Flux host drives the encoder propagation engine on a real (tiny, random) FluxTransformer2DModel."""

from __future__ import annotations

import pytest
import torch
from comfy_harness import NOT_IN_THIS_ENVIRONMENT

diffusers = pytest.importorskip("diffusers", reason=f"diffusers {NOT_IN_THIS_ENVIRONMENT}")

from reuse_core.adapters.diffusers_attention import DiffusersAttentionReuse, ReuseFluxAttnProcessor  # noqa: E402
from reuse_core.adapters.diffusers_transformer import DiffusersFluxHost  # noqa: E402
from reuse_core.attention_engine import AttentionReuseConfig  # noqa: E402
from reuse_core.encoder_engine import EncoderPropagationEngine  # noqa: E402
from reuse_core.key_steps import KeyStepSpec, make_plan  # noqa: E402
from reuse_core.schedules import ReuseSchedule, hurry  # noqa: E402
from reuse_core.steps import StepMatch  # noqa: E402

STEPS = 6
SIGMAS = torch.linspace(1.0, 0.0, STEPS + 1)
SIDE, TEXT = 4, 3  # 4x4 image tokens, 3 text tokens


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        in_channels=4,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=6,
        axes_dims_rope=(2, 2, 4),
    )
    # Default-initialised weights this small change the stream little per block; tripled, every block and the
    # time embedding move the output visibly, so a wrong split or a stale embedding cannot hide in rounding.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval().requires_grad_(False)


def inputs(batch=2):
    gen = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(SIDE, SIDE, 3)
    img_ids[..., 1] = torch.arange(SIDE)[:, None]
    img_ids[..., 2] = torch.arange(SIDE)[None, :]
    return (
        torch.randn(batch, SIDE * SIDE, 4, generator=gen),
        torch.randn(batch, TEXT, 12, generator=gen),
        {
            "pooled_projections": torch.randn(batch, 6, generator=gen),
            "img_ids": img_ids.view(-1, 3),
            "txt_ids": torch.zeros(TEXT, 3),
        },
    )


def native(flux, x, sigma, ctx, extra):
    return flux(hidden_states=x, encoder_hidden_states=ctx, timestep=sigma, return_dict=False, **extra)[0]


def loop(predict):
    """Euler flow steps that feed each output back, so a deviation at any step shows in the result."""
    x, ctx, extra = inputs()
    outs = []
    with torch.no_grad():
        for i in range(STEPS):
            v = predict(i, x, SIGMAS[i].expand(x.shape[0]), ctx, extra)
            outs.append(v)
            x = x + (SIGMAS[i + 1] - SIGMAS[i]) * v
    return x, outs


def engine_predict(flux, spec, parallel, encoder_blocks=None):
    host = DiffusersFluxHost(flux, encoder_blocks)
    engine = EncoderPropagationEngine(make_plan(spec, STEPS, max_batch=4), SIGMAS[:-1].tolist(), parallel=parallel)

    def predict(i, x, sigma, ctx, extra):
        return engine.predict(host, x, sigma, ctx, step=StepMatch(i, True), cache_key="cfg", **extra)

    return engine, predict


def test_default_split_is_the_paper_fraction_with_a_block_on_each_side(flux):
    assert DiffusersFluxHost(flux).encoder_blocks == 3  # round(18/28 * 5)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="encoder_blocks: must be an integer from 1 to 4"):
            DiffusersFluxHost(flux, bad)


@pytest.mark.parametrize("encoder_blocks", [1, 2, 3, 4])  # inside the double blocks, at the seam, in the singles
def test_encode_then_decode_equals_the_native_forward_bit_for_bit(flux, encoder_blocks):
    host = DiffusersFluxHost(flux, encoder_blocks)
    x, ctx, extra = inputs()
    sigma = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        reference = native(flux, x, sigma, ctx, extra)
        features = host.encode(x, sigma, ctx, **extra)
        out, captured = host.full_forward(x, sigma, ctx, capture=True, **extra)
        assert host.full_forward(x, sigma, ctx, capture=False, **extra)[1] is None
        assert torch.equal(host.decode(features, sigma, ctx, **extra), reference)
        assert torch.equal(out, reference)
    assert features.skips == () and set(features.streams) == {"txt"}
    assert torch.equal(captured.middle, features.middle)
    assert features.streams["txt"].shape == (2, TEXT, 16)


def test_decode_uses_the_decode_timestep(flux):
    host = DiffusersFluxHost(flux)
    x, ctx, extra = inputs()
    with torch.no_grad():
        features = host.encode(x, torch.full((2,), 0.9), ctx, **extra)
        early = host.decode(features, torch.full((2,), 0.9), ctx, **extra)
        late = host.decode(features, torch.full((2,), 0.2), ctx, **extra)
    assert (early - late).abs().max() > 1e-3


def test_every_step_a_key_step_equals_the_unpatched_model(flux):
    reference, _ = loop(lambda i, x, s, ctx, extra: native(flux, x, s, ctx, extra))
    engine, predict = engine_predict(flux, KeyStepSpec("uniform", k=1), parallel=True)
    patched, _ = loop(predict)
    assert torch.equal(patched, reference)
    assert engine.stats.encoder_passes_saved == 0


@pytest.mark.parametrize("parallel", [False, True])
def test_decoder_only_steps_skip_the_encoder(flux, parallel):
    _, ref_steps = loop(lambda i, x, s, ctx, extra: native(flux, x, s, ctx, extra))
    engine, predict = engine_predict(flux, KeyStepSpec("uniform", k=3), parallel=parallel)
    patched, steps = loop(predict)
    assert engine.stats.full_steps == {0, 3}
    assert engine.stats.encoder_passes_saved == 4
    assert engine.stats.decoder_batches == (2 if parallel else 4)
    assert torch.equal(steps[0], ref_steps[0])
    assert not torch.allclose(steps[1], ref_steps[1], atol=1e-4)
    assert torch.isfinite(patched).all()


@pytest.mark.parametrize("encoder_blocks", [1, 3])
def test_parallel_and_sequential_decoding_agree(flux, encoder_blocks):
    spec = KeyStepSpec("uniform", k=3)
    _, sequential = loop(engine_predict(flux, spec, parallel=False, encoder_blocks=encoder_blocks)[1])
    _, batched = loop(engine_predict(flux, spec, parallel=True, encoder_blocks=encoder_blocks)[1])
    for a, b in zip(sequential, batched, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_host_rejects_what_it_cannot_run(flux):
    host = DiffusersFluxHost(flux)
    x, ctx, extra = inputs()
    sigma = torch.full((2,), 0.5)
    with pytest.raises(ValueError, match=r"unsupported transformer inputs \['controlnet_block_samples'\]"):
        host.encode(x, sigma, ctx, controlnet_block_samples=[x], **extra)
    with pytest.raises(ValueError, match="pooled_projections: required"):
        host.encode(x, sigma, ctx, img_ids=extra["img_ids"], txt_ids=extra["txt_ids"])
    with pytest.raises(ValueError, match="img_ids and txt_ids: required"):
        host.encode(x, sigma, ctx, pooled_projections=extra["pooled_projections"])
    with pytest.raises(TypeError, match="FluxTransformer2DModel-like"):
        DiffusersFluxHost(torch.nn.Linear(2, 2))


# Attention Map Reuse on the same transformer: FluxAttention layers get the Flux processor.


def plain(flux):
    return lambda i, x, s, ctx, extra: native(flux, x, s, ctx, extra)


def test_attention_reuse_without_reuse_steps_is_bit_identical(flux):
    reference, _ = loop(plain(flux))
    adapter = DiffusersAttentionReuse(flux, AttentionReuseConfig(mode="map"), hurry(STEPS, 0))
    with adapter:
        assert len(flux.attn_processors) == 5
        assert all(isinstance(p, ReuseFluxAttnProcessor) for p in flux.attn_processors.values())

        def predict(i, x, s, ctx, extra):
            adapter.set_step(i)
            return native(flux, x, s, ctx, extra)

        patched, _ = loop(predict)
        assert adapter.run.stats.reused == 0
    assert torch.equal(patched, reference)
    assert not any(isinstance(p, ReuseFluxAttnProcessor) for p in flux.attn_processors.values())  # restored


@pytest.mark.parametrize("mode", ["map", "output"])
def test_attention_reuse_on_flux_reuses_calls_and_stays_close(flux, mode):
    _, ref_steps = loop(plain(flux))
    adapter = DiffusersAttentionReuse(flux, AttentionReuseConfig(mode=mode), ReuseSchedule((1, 1, 1, 0, 1, 0)))
    # Flux takes the timestep as its fourth argument (by keyword here): the step must still be found from it.
    adapter.track_timesteps(SIGMAS[:-1])
    with adapter:
        patched, steps = loop(plain(flux))
        stats = adapter.run.stats
        assert stats.reused == 2 * len(flux.attn_processors)  # 2 reuse steps x every attention layer
        assert stats.steps_reused == {3, 5} and stats.fallbacks == 0
    for i in range(2):
        assert torch.equal(steps[i], ref_steps[i])
    torch.testing.assert_close(steps[2], ref_steps[2], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(steps[3], ref_steps[3], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(patched).all()


def test_attention_reuse_finds_a_positional_flux_timestep(flux):
    x, ctx, extra = inputs()
    adapter = DiffusersAttentionReuse(flux, AttentionReuseConfig(mode="map"), hurry(STEPS, 1))
    adapter.track_timesteps(SIGMAS[:-1])
    with adapter, torch.no_grad():
        sigma = SIGMAS[4].expand(2)
        flux(x, ctx, extra["pooled_projections"], sigma, extra["img_ids"], extra["txt_ids"])
        assert adapter.step == 4
