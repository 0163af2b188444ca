"""The encoder-propagation engine on a toy encoder/decoder host (no ComfyUI)."""

import math

import pytest
import torch
from torch import nn

from reuse_core.encoder_engine import (
    EncoderDecoderHost,
    EncoderFeatures,
    EncoderPropagationConfig,
    EncoderPropagationEngine,
    encoder_block_count,
    tile_rows,
)
from reuse_core.key_steps import KeyStepSpec, make_plan
from reuse_core.steps import StepMatch, match_step


def time_embedding(timesteps, dim=16):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ToyUNet(nn.Module):
    """Two-level conv U-Net with time and context conditioning; rows are independent."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.time = nn.Linear(16, 8)
        self.ctx = nn.Linear(6, 8)
        self.inp = nn.Conv2d(4, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.Conv2d(16, 8, 3, padding=1)
        self.out = nn.Conv2d(16, 4, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.2

    def emb(self, timesteps, context):
        return self.time(time_embedding(timesteps)) + self.ctx(context.mean(dim=1))

    def encode(self, x, timesteps, context):
        e = self.emb(timesteps, context)[:, :, None, None]
        s0 = torch.tanh(self.inp(x) + e)
        s1 = torch.tanh(self.down(s0))
        return (s0, s1), torch.tanh(self.mid(s1) + e)

    def decode(self, skips, middle, timesteps, context):
        e = self.emb(timesteps, context)[:, :, None, None]
        h = torch.tanh(self.up(torch.cat([middle, skips[1]], dim=1)) + e)
        h = nn.functional.interpolate(h, scale_factor=2)
        return self.out(torch.cat([h, skips[0]], dim=1))


class ToyHost:
    """Adapter in the engine's host interface; counts encoder/decoder invocations and decoder batch rows."""

    def __init__(self, net):
        self.net = net
        self.encodes = 0
        self.decode_rows = []

    def encode(self, x, timesteps, context, **extra):
        self.encodes += 1
        skips, middle = self.net.encode(x, timesteps, context)
        return EncoderFeatures(skips, middle)

    def decode(self, features, timesteps, context, **extra):
        self.decode_rows.append(features.batch_size)
        assert timesteps.shape[0] == context.shape[0] == features.batch_size
        return self.net.decode(features.skips, features.middle, timesteps, context)


class CapturingHost(ToyHost):
    def __init__(self, net):
        super().__init__(net)
        self.captures = []

    def full_forward(self, x, timesteps, context, *, capture, **extra):
        self.encodes += 1
        self.captures.append(capture)
        skips, middle = self.net.encode(x, timesteps, context)
        out = self.net.decode(skips, middle, timesteps, context)
        return out, (EncoderFeatures(skips, middle) if capture else None)


SIGMAS = torch.tensor([14.6, 8.0, 5.0, 3.0, 2.0, 1.3, 0.8, 0.5, 0.3, 0.15, 0.0])


def timestep_of(sigma):
    return 1000.0 * float(sigma) / (float(sigma) + 1.0)


def euler_run(host, engine, *, batch=2, heun=False, seed=0):
    """A small Euler (or Heun) sampler calling the engine once per model evaluation; returns the final x."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=gen) * float(SIGMAS[0])
    context = torch.randn(batch, 5, 6, generator=gen)

    def model(x, sigma):
        ts = torch.full((batch,), timestep_of(sigma))
        eps = engine.predict(
            host, x / math.sqrt(1 + float(sigma) ** 2), ts, context, step=match_step(sigma, SIGMAS), cache_key="cond"
        )
        return x - eps * float(sigma)

    for i in range(len(SIGMAS) - 1):
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        d = (x - model(x, s)) / s
        if heun and s_next > 0:
            x_pred = x + d * (s_next - s)
            d = (d + (x_pred - model(x_pred, s_next)) / s_next) / 2
        x = x + d * (s_next - s)
    return x


def make_engine(preset="uniform", k=3, parallel=True, max_batch=4, steps=10):
    plan = make_plan(KeyStepSpec(preset, k), steps, max_batch=max_batch)
    return EncoderPropagationEngine(plan, [timestep_of(s) for s in SIGMAS[:-1]], parallel)


@pytest.fixture(scope="module")
def net():
    return ToyUNet().eval()


def test_toy_hosts_implement_the_protocol(net):
    assert isinstance(ToyHost(net), EncoderDecoderHost)
    assert isinstance(CapturingHost(net), EncoderDecoderHost)


@torch.no_grad()
def test_every_step_a_key_step_is_the_plain_model(net):
    class PlainEngine:
        def predict(self, host, x, ts, context, **_):
            skips, middle = net.encode(x, ts, context)
            return net.decode(skips, middle, ts, context)

    reference = euler_run(None, PlainEngine())
    host = CapturingHost(net)
    out = euler_run(host, make_engine(k=1))
    assert torch.equal(out, reference)
    assert host.captures == [False] * 10  # nothing cached when no step reuses


@torch.no_grad()
@pytest.mark.parametrize(("preset", "k", "heun"), [("uniform", 3, False), ("one_pass", 4, False), ("paper", 4, True)])
@pytest.mark.parametrize("host_cls", [ToyHost, CapturingHost])
def test_parallel_and_sequential_decoding_agree(net, preset, k, heun, host_cls):
    seq_host, par_host = host_cls(net), host_cls(net)
    seq_engine = make_engine(preset, k, parallel=False)
    par_engine = make_engine(preset, k, parallel=True, max_batch=4)
    seq = euler_run(seq_host, seq_engine, heun=heun)
    par = euler_run(par_host, par_engine, heun=heun)
    assert (par - seq).norm() / seq.norm() < 1e-4
    # Same number of encoder passes; fewer, larger decoder calls with parallel decoding.
    assert par_host.encodes == seq_host.encodes
    assert par_engine.stats.encoder_passes_saved == seq_engine.stats.encoder_passes_saved > 0
    assert par_engine.stats.decoder_batches < seq_engine.stats.decoder_batches
    assert max(par_host.decode_rows) > 2


@torch.no_grad()
def test_reuse_skips_the_encoder_and_stats_count_it(net):
    host = ToyHost(net)
    engine = make_engine("uniform", 3, parallel=True, max_batch=2)
    euler_run(host, engine)
    # Keys {0, 3, 6, 9}; decoder-only {1, 2, 4, 5, 7, 8} in batches (1,2), (4,5), (7,8).
    assert host.encodes == 4
    assert engine.stats.full_steps == {0, 3, 6, 9}
    assert engine.stats.encoder_passes_saved == 6
    assert engine.stats.decoder_batches == 3  # decoder-only batches; full passes are not counted
    assert host.decode_rows == [2, 4, 2, 4, 2, 4, 2]  # encode+decode at keys, 2-step batches in between
    assert engine.stats.stored_predictions_used == 3
    assert engine.stats.largest_batch == 2
    assert "encoder passes saved 6/10 calls" in engine.stats.summary()


@torch.no_grad()
def test_reuse_changes_the_output_but_stays_close(net):
    reference = euler_run(ToyHost(net), make_engine(k=1))
    reused = euler_run(ToyHost(net), make_engine("uniform", 2))
    assert not torch.equal(reused, reference)
    assert torch.isfinite(reused).all()


@torch.no_grad()
def test_decoder_on_fresh_features_is_the_full_forward(net):
    host = ToyHost(net)
    gen = torch.Generator().manual_seed(3)
    x, ctx, ts = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 6, generator=gen), torch.tensor([700.0, 700])
    features = host.encode(x, ts, ctx)
    batched = host.decode(features.tile(3), ts.repeat(3), ctx.repeat(3, 1, 1))
    single = host.decode(features, ts, ctx)
    torch.testing.assert_close(batched[2:4], single, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_intermediate_evaluations_decode_at_their_own_timestep_and_keep_the_cache(net):
    host = CapturingHost(net)
    engine = make_engine("uniform", 4, parallel=True)
    gen = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 6, generator=gen)

    def call(step, ts):
        return engine.predict(host, x, torch.full((2,), ts), ctx, step=step, cache_key="k")

    call(StepMatch(0, True), 900.0)  # key step: full pass, features kept (step 1 reuses)
    assert host.captures == [True]
    mid = call(StepMatch(1, False), 850.0)  # intermediate evaluation inside decoder-only step 1
    features = engine.cached_features("k")
    torch.testing.assert_close(mid, host.decode(features, torch.full((2,), 850.0), ctx), rtol=0, atol=0)
    assert engine._predictions == {}  # intermediate calls never launch or use parallel batches
    call(StepMatch(0, False), 880.0)  # intermediate evaluation inside key step 0: full, cache untouched
    assert host.encodes == 2 and engine.cached_features("k") is features
    call(StepMatch(1, True), 800.0)  # exact decoder-only step: launches the batch (1, 2, 3)
    assert sorted(j for _, j in engine._predictions) == [2, 3]


@torch.no_grad()
def test_cache_keys_are_separate_and_unbatchable_calls_decode_alone(net):
    host = ToyHost(net)
    engine = make_engine("one_pass", parallel=True)
    gen = torch.Generator().manual_seed(5)
    xa, xb = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    ctx = torch.randn(1, 5, 6, generator=gen)
    ts = torch.tensor([900.0])
    engine.predict(host, xa, ts, ctx, step=StepMatch(0, True), cache_key="a")
    # No features for "b" yet: even a decoder-only step runs in full for it.
    engine.predict(host, xb, ts, ctx, step=StepMatch(1, True), cache_key="b")
    assert host.encodes == 2
    engine.predict(host, xa, ts, ctx, step=StepMatch(1, True), cache_key="a", batchable=False)
    assert host.decode_rows[-1] == 1 and not engine._predictions
    engine.predict(host, xa, ts, ctx, step=StepMatch(2, True), cache_key="a")  # launches (2, 3, 4)
    assert host.decode_rows[-1] == 3 and sorted(j for _, j in engine._predictions) == [3, 4]
    # An unbatchable call (per-step inputs) decodes afresh instead of using the stored prediction.
    engine.predict(host, xa, ts, ctx, step=StepMatch(3, True), cache_key="a", batchable=False)
    assert host.decode_rows[-1] == 1 and engine.stats.stored_predictions_used == 0
    engine.reset()
    assert not engine._features and engine.stats.full_passes == 0


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_decoders_per_batch"):
        EncoderPropagationConfig(max_decoders_per_batch=0)
    with pytest.raises(ValueError, match="start_percent"):
        EncoderPropagationConfig(start_percent=0.6, end_percent=0.5)
    with pytest.raises(ValueError, match="end_percent"):
        EncoderPropagationConfig(end_percent=1.5)
    plan = EncoderPropagationConfig(key_steps=KeyStepSpec("uniform", 2), max_decoders_per_batch=1).plan(6)
    assert plan.full_steps == frozenset({0, 2, 4}) and plan.decode_batches == ((1,), (3,), (5,))


@pytest.mark.parametrize(
    ("fraction", "depth", "blocks"),
    [(18 / 28, 28, 18), (18 / 28, 57, 37), (18 / 28, 2, 1), (0.05, 10, 1), (0.95, 6, 5)],
)
def test_encoder_block_count_keeps_a_block_on_each_side(fraction, depth, blocks):
    assert encoder_block_count(fraction, depth) == blocks


def test_encoder_block_count_refuses_a_single_block():
    with pytest.raises(ValueError, match="1 block"):
        encoder_block_count(0.5, 1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, math.nan, True])
def test_encoder_fraction_is_validated(fraction):
    with pytest.raises(ValueError, match="encoder_fraction"):
        EncoderPropagationConfig(encoder_fraction=fraction)


def test_transformer_features_tile_their_streams_and_rows_tile_inside_lists():
    features = EncoderFeatures((), torch.arange(2.0).view(2, 1), {"txt": torch.arange(4.0).view(2, 2)})
    tiled = features.tile(3)
    assert tiled.batch_size == 6 and torch.equal(tiled.streams["txt"][2:4], features.streams["txt"])
    refs = [torch.zeros(2, 3), torch.zeros(1, 3)]
    assert [r.shape[0] for r in tile_rows(refs, 3, rows=2)] == [6, 1]
    assert tile_rows({"not": "tiled"}, 3, rows=2) == {"not": "tiled"}
