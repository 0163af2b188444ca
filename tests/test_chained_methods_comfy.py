"""Attention Map Reuse chained with Encoder Feature Propagation (both orders) in real ComfyUI, plus the engine's
multi-step batch path (``AttentionReuseRun.attention_steps``) on its own."""

import functools
import logging
import re

import comfy_harness as h
import pytest
import torch
import torch.nn.functional as F

from reuse_core.attention_engine import AttentionReuseConfig, AttentionReuseRun
from reuse_core.attention_math import from_heads, to_heads
from reuse_core.metrics import psnr
from reuse_core.schedules import ReuseSchedule

STEPS = 8
SIZE = 8
CFG = 5.0
# uniform k=4 on 8 steps: key steps 0 and 4; decoder-only steps 1-3 and 5-7 (parallel batches (1,2,3), (5,6,7)).
ENCODER = dict(key_steps="uniform", uniform_k=4, parallel_decoding=False)
# Reuses at decoder-only steps 3 and 5: step 3 reuses what decoder-only step 2 stored (inside one parallel batch
# (1,2,3)), step 5 what key step 4 stored (a full forward, where the encoder's attention calls come first).
DECODER_ONLY_REUSE = "11101011"
DECODER_CALLS_PER_FORWARD = 8  # tiny SD1.5: 4 output blocks x (attn1 + attn2), CFG in one batch
ATTENTION_LAYERS = 14  # plus 2 input blocks and the middle block: a layer keeps one key at every kind of step

# Each node does nothing until a test asks: no reuse, every step a key step.
ATTENTION_OFF = dict(strategy="custom", reuse_steps=0, custom_schedule="1")
ENCODER_OFF = dict(key_steps="uniform", uniform_k=1, custom_key_steps="0", noise_tau=600.0)


# Engine: a batch of several steps --------------------------------------------------------------------------


def fused_on(q, k, v, mask=None):
    return from_heads(F.scaled_dot_product_attention(*(to_heads(t, 4, "bnc") for t in (q, k, v))), "bnc")


def step_qkv(step, rows=2, tokens=16):
    gen = torch.Generator().manual_seed(step)
    return tuple(torch.randn(rows, tokens, 32, generator=gen) for _ in range(3))


@pytest.mark.parametrize("mode", ["map", "output"])
def test_split_batch_makes_the_sequential_decisions(mode):
    schedule = ReuseSchedule((1, 1, 0, 1))  # step 1 stores, step 2 reuses it, step 3 computes
    sequential = AttentionReuseRun(AttentionReuseConfig(mode=mode), schedule)
    expected = [
        sequential.attention(lambda s=s: fused_on(*step_qkv(s)), *step_qkv(s), heads=4, step=s, layer_key="L")
        for s in range(4)
    ]
    batched = AttentionReuseRun(AttentionReuseConfig(mode=mode), schedule)
    first = batched.attention(lambda: fused_on(*step_qkv(0)), *step_qkv(0), heads=4, step=0, layer_key="L")
    q, k, v = (torch.cat(parts) for parts in zip(*(step_qkv(s) for s in (1, 2, 3)), strict=True))
    rest = batched.attention_steps(fused_on, q, k, v, heads=4, row_steps=(1, 2, 3), layer_key="L")
    assert torch.equal(first, expected[0])
    assert torch.allclose(rest, torch.cat(expected[1:]), atol=1e-5)
    assert not torch.allclose(rest[2:4], fused_on(*step_qkv(2)), atol=1e-3)  # really reused
    assert batched.stats == sequential.stats and batched.stats.steps_reused == {2}


def test_batch_without_store_or_reuse_is_one_fused_call_and_unsplittable_batches_stay_fresh():
    run = AttentionReuseRun(AttentionReuseConfig(mode="map"), ReuseSchedule((1, 1, 1, 0)))
    calls = []

    def counting(q, k, v, mask=None):
        calls.append(q.shape[0])
        return fused_on(q, k, v)

    q, k, v = step_qkv(0, rows=6)
    out = run.attention_steps(counting, q, k, v, heads=4, row_steps=(0, 1, None), layer_key="L")
    assert calls == [6] and torch.equal(out, fused_on(q, k, v))
    assert run.stats.computed == 2 and run.stats.fresh == 1 and len(run.cache) == 0
    mask = torch.ones(4, 16, 16, dtype=torch.bool)  # 4 rows of mask for a 6-row batch: cannot be split by step
    out = run.attention_steps(counting, q, k, v, heads=4, row_steps=(1, 2, 3), layer_key="L", mask=mask)
    assert calls == [6, 6] and torch.equal(out, fused_on(q, k, v)) and len(run.cache) == 0
    assert run.stats.fresh == 4 and run.stats.reused == 0


# Real ComfyUI: both nodes chained ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nodes(comfy):
    return h.pack_node("AttentionMapReuse"), h.pack_node("EncoderFeaturePropagation")


@pytest.fixture(scope="module")
def sd15(comfy):
    return h.sharpen_attention(h.tiny_model("sd15", seed=3))


def with_attention(nodes, model, **settings):
    return nodes[0].execute(model=model, **h.node_inputs(nodes[0], **{**ATTENTION_OFF, **settings})).result[0]


def with_encoder(nodes, model, **settings):
    return nodes[1].execute(model=model, **h.node_inputs(nodes[1], **{**ENCODER_OFF, **settings})).result[0]


def chained(nodes, model, order, attention, encoder):
    if order == "encoder_first":  # Load Checkpoint -> Encoder Feature Propagation -> Attention Map Reuse
        return with_attention(nodes, with_encoder(nodes, model, **encoder), **attention)
    return with_encoder(nodes, with_attention(nodes, model, **attention), **encoder)


def run(model, sampler="euler", **kwargs):
    return h.sample(model, steps=STEPS, cfg=CFG, sampler=sampler, size=SIZE, **kwargs)


@functools.cache
def _reference(model, nodes, what, sampler):
    if what == "full":
        return run(model, sampler)
    if what == "attention":
        return run(with_attention(nodes, model, custom_schedule=DECODER_ONLY_REUSE), sampler)
    return run(with_encoder(nodes, model, **dict(ENCODER, parallel_decoding=True)), sampler)


@pytest.fixture(scope="module")
def reference(sd15, nodes):
    _reference.cache_clear()
    yield lambda what, sampler="euler": _reference(sd15, nodes, what, sampler)
    _reference.cache_clear()


def counts(record) -> dict:
    """What the chained tests compare of an attention run between parallel and sequential decoding."""
    return {
        "reused": record.calls_reused,
        "stored": record.stored,
        "computed": record.computed,
        "steps": f"{record.reused_steps}/{record.steps}",
        "layers": record.layers,
        "fallbacks": record.fallbacks,
    }


ORDERS = ["encoder_first", "attention_first"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_switched_off_parts_change_nothing(nodes, sd15, reference, order, sampler):
    both_off = chained(nodes, sd15, order, {}, dict(uniform_k=1))
    assert torch.equal(run(both_off, sampler), reference("full", sampler))
    attention_only = chained(nodes, sd15, order, dict(custom_schedule=DECODER_ONLY_REUSE), dict(uniform_k=1))
    assert torch.equal(run(attention_only, sampler), reference("attention", sampler))
    encoder_only = chained(nodes, sd15, order, {}, dict(ENCODER, parallel_decoding=True))
    assert torch.equal(run(encoder_only, sampler), reference("encoder", sampler))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mode", ["map", "output"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_attention_reuse_happens_at_decoder_only_steps(nodes, sd15, reference, runs, caplog, order, mode, sampler):
    """Also the chained matrix case: both nodes' runs recorded, each applying its own schedule."""
    caplog.set_level(logging.INFO)
    attention = dict(custom_schedule=DECODER_ONLY_REUSE, mode=mode)
    outputs, stats = {}, {}
    for parallel in (False, True):
        caplog.clear()
        runs.clear()
        model = chained(nodes, sd15, order, attention, dict(ENCODER, parallel_decoding=parallel))
        outputs[parallel] = run(model, sampler)
        assert len(runs.attention) == len(runs.encoder) == 1, runs.records
        stats[parallel] = counts(runs.last())
        encoder = runs.last("EncoderFeaturePropagation")
        assert encoder.key_steps == (0, 4) and (encoder.steps, encoder.reused_steps) == (STEPS, 6), encoder
        assert encoder.encoder_passes_saved >= 6, encoder
        assert not any("no usable cached" in r.getMessage() for r in caplog.records)
        assert stats[parallel]["steps"] == "2/8" and stats[parallel]["fallbacks"] == 0, stats[parallel]
        assert stats[parallel]["layers"] == ATTENTION_LAYERS
    if sampler == "euler":  # steps 3 and 5 reuse every decoder layer, once each, in both decoding modes
        assert stats[False]["reused"] == stats[True]["reused"] == 2 * DECODER_CALLS_PER_FORWARD
        assert stats[False] == stats[True]
    else:
        assert stats[False]["reused"] >= 2 * DECODER_CALLS_PER_FORWARD and stats[True]["reused"] > 0
    # Parallel decoding splits its batch by step, so it makes the sequential decisions.
    assert torch.allclose(outputs[True], outputs[False], atol=1e-4, rtol=1e-4)
    encoder_only = reference("encoder", sampler)
    assert not torch.equal(outputs[True], encoder_only)  # the reuse changed something
    full = reference("full", sampler)
    for out in outputs.values():
        assert torch.isfinite(out).all() and 30.0 < psnr(out, full) < float("inf")


@pytest.mark.parametrize("mode", ["map", "output"])
def test_reuse_across_key_steps_with_parallel_batches(nodes, sd15, reference, runs, mode):
    """hurry: reuse at steps 4-7. Step 3 (decoder-only) stores the decoder layers; at key step 4 the encoder layers
    have nothing stored and compute fresh (counted fallbacks); batch (5,6,7) reuses step 3's maps."""
    attention = dict(strategy="hurry", reuse_steps=4, mode=mode)
    outputs, stats = {}, {}
    for parallel in (False, True):
        outputs[parallel] = run(
            chained(nodes, sd15, "encoder_first", attention, dict(ENCODER, parallel_decoding=parallel))
        )
        stats[parallel] = counts(runs.last())
    assert stats[False] == stats[True]
    assert stats[True]["steps"] == "4/8" and stats[True]["reused"] == 4 * DECODER_CALLS_PER_FORWARD
    assert stats[True]["fallbacks"] == 6  # key step 4: the encoder's 6 attention calls (2 input blocks + middle)
    assert torch.allclose(outputs[True], outputs[False], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(outputs[True]).all() and psnr(outputs[True], reference("full")) > 30.0


def test_self_and_cross_detection_in_decoder_batches(nodes, sd15, runs):
    reused, outputs = {}, {}
    for target in ("both", "self", "cross"):
        attention = dict(custom_schedule=DECODER_ONLY_REUSE, attention=target)
        outputs[target] = run(chained(nodes, sd15, "attention_first", attention, dict(ENCODER, parallel_decoding=True)))
        reused[target] = runs.last().calls_reused
    assert reused["self"] == reused["cross"] == reused["both"] // 2 > 0
    assert not torch.equal(outputs["self"], outputs["cross"])


def test_sdxl_chained(nodes, comfy, runs):
    model = h.tiny_model("sdxl", seed=0)
    full = run(model, kind="sdxl")
    off = chained(nodes, model, "encoder_first", {}, dict(uniform_k=1))
    assert torch.equal(run(off, kind="sdxl"), full)
    outputs = {}
    for parallel in (False, True):
        attention = dict(custom_schedule=DECODER_ONLY_REUSE)
        model_p = chained(nodes, model, "attention_first", attention, dict(ENCODER, parallel_decoding=parallel))
        outputs[parallel] = run(model_p, kind="sdxl")
        stats = runs.last()
        assert (stats.reused_steps, stats.steps) == (2, 8) and stats.calls_reused > 0 and stats.fallbacks == 0, stats
    assert torch.allclose(outputs[True], outputs[False], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(outputs[True]).all() and psnr(outputs[True], full) > 30.0


def test_run_summary_lines_match_the_recorded_stats(nodes, sd15, runs, caplog):
    """The one test that reads the nodes' summary lines: each says exactly what the engine's stats objects hold
    (every other test reads those through ``runs``). The optional segments show too: the attention fallbacks (the
    encoder's layers at key step 4) and the encoder's noise injection."""
    caplog.set_level(logging.INFO)
    attention = dict(strategy="hurry", reuse_steps=4, mode="map")
    encoder = dict(ENCODER, parallel_decoding=True, noise_alpha=0.003)
    run(chained(nodes, sd15, "encoder_first", attention, encoder))
    a, e = runs.last("AttentionMapReuse"), runs.last("EncoderFeaturePropagation")
    assert len(runs.records) == 2, runs.records
    # The records hold what this run must have done (so the lines below are checked against real numbers).
    assert (a.steps, a.reused_steps, a.schedule, a.layers, a.mode) == (STEPS, 4, "11110000", ATTENTION_LAYERS, "map"), a
    assert a.calls_reused == 4 * DECODER_CALLS_PER_FORWARD and a.fallbacks == 6 and a.memory_mib > 0, a
    assert a.stats.reused == a.calls_reused and a.stats.steps_reused == {4, 5, 6, 7}, a.stats
    assert e.preset == "uniform k=4" and e.parallel_decoding and e.max_decoders_per_batch == 4, e
    assert e.key_steps == (0, 4) and (e.encoder_passes_saved, e.model_calls) == (6, STEPS), e
    assert (e.decoder_batches, e.decoded_steps, e.largest_batch, e.served_from_parallel) == (2, 6, 3, 4), e
    assert (e.noise_alpha, e.noise_tau) == (0.003, ENCODER_OFF["noise_tau"]) and e.stats.full_steps == {0, 4}, e

    lines = [r.getMessage() for r in caplog.records]
    attention_lines = [m for m in lines if m.startswith("Attention Map Reuse: steps")]
    encoder_lines = [m for m in lines if m.startswith("Encoder Feature Propagation: ")]
    assert len(attention_lines) == len(encoder_lines) == 1, lines
    wall = r", wall \d+\.\d\d s"
    assert re.fullmatch(
        re.escape(
            f"Attention Map Reuse: steps reused {a.reused_steps}/{a.steps} (schedule {a.schedule}), "
            f"layers patched {a.layers}, {a.mode}s memory {a.memory_mib:.1f} MiB (budget {a.budget_mb:g} MB), "
            f"calls reused {a.calls_reused}, stored {a.stored}, computed {a.computed}, "
            f"fallbacks {a.fallbacks}, refused stores {a.refused}"
        )
        + wall,
        attention_lines[0],
    ), attention_lines[0]
    assert re.fullmatch(
        re.escape(
            f"Encoder Feature Propagation: {e.preset}, {e.steps} steps, parallel, max {e.max_decoders_per_batch}, "
            f"noise injection alpha={e.noise_alpha} tau={e.noise_tau}: key steps {list(e.key_steps)}, "
            f"encoder passes saved {e.encoder_passes_saved}/{e.model_calls} calls, "
            f"decoder batches {e.decoder_batches} ({e.decoded_steps} steps decoded, largest batch {e.largest_batch}, "
            f"{e.served_from_parallel} served from parallel decoding)"
        )
        + wall,
        encoder_lines[0],
    ), encoder_lines[0]
