import pytest
import torch
import torch.nn.functional as F

from reuse_core.attention_engine import Action, AttentionReuseConfig, AttentionReuseRun
from reuse_core.attention_math import attention_with_map, from_heads, reuse_map, to_heads
from reuse_core.schedules import hurry, parse_bits


def qkv(b=2, h=4, nq=64, nk=64, d=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=gen).to(dtype) for n in (nq, nk, nk))


@pytest.mark.parametrize("nk", [64, 7])
def test_explicit_attention_equals_fused_sdpa(nk):
    q, k, v = qkv(nk=nk)
    out, probs = attention_with_map(q, k, v)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    assert probs.shape == (2, 4, 64, nk)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 64), atol=1e-5)
    assert torch.allclose(reuse_map(probs, v), out, atol=1e-6)  # nothing reused: P @ V is the output


def test_explicit_attention_with_mask_equals_sdpa():
    q, k, v = qkv(nk=10)
    mask = torch.ones(64, 10, dtype=torch.bool)
    mask[:, 7:] = False
    out, probs = attention_with_map(q, k, v, mask=mask)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5)
    assert probs[..., 7:].abs().max() == 0


def test_half_precision_map_is_kept_in_value_dtype():
    q, k, v = qkv(dtype=torch.bfloat16)
    out, probs = attention_with_map(q, k, v)
    assert probs.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert torch.allclose(out.float(), ref, atol=3e-2)


def test_layouts_round_trip():
    x = torch.randn(2, 10, 4 * 8)
    heads = to_heads(x, 4, "bnc")
    assert heads.shape == (2, 4, 10, 8)
    assert torch.equal(from_heads(heads, "bnc"), x)
    with pytest.raises(ValueError, match="layout"):
        to_heads(x, 4, "nbc")


def flat(t):
    return from_heads(t, "bnc")


def drive(run, schedule_steps, seeds, mode_kind=None, chunk=("c",), layout="bnc"):
    """Call the engine once per step for one layer; returns outputs and the fused outputs for comparison."""
    outs, fused_outs = [], []
    for step in range(schedule_steps):
        q, k, v = qkv(seed=seeds[step])
        if layout == "bnc":
            q, k, v = flat(q), flat(k), flat(v)
        fused_out = from_heads(F.scaled_dot_product_attention(*(to_heads(t, 4, layout) for t in (q, k, v))), layout)
        fused_outs.append(fused_out)
        outs.append(
            run.attention(
                lambda f=fused_out: f,
                q,
                k,
                v,
                heads=4,
                step=step,
                layer_key=0,
                chunk_key=chunk,
                layout=layout,
                kind=mode_kind,
            )
        )
    return outs, fused_outs


@pytest.mark.parametrize("layout", ["bnc", "bhnd"])
def test_engine_map_mode_reuses_stored_map_with_fresh_values(layout):
    run = AttentionReuseRun(AttentionReuseConfig(mode="map"), hurry(4, 2))
    assert run.plan == (Action.COMPUTE, Action.STORE, Action.REUSE, Action.REUSE)
    outs, fused = drive(run, 4, seeds=[0, 1, 2, 3], layout=layout)
    assert torch.equal(outs[0], fused[0])  # plain compute step: the host's fused result, untouched
    assert torch.allclose(outs[1], fused[1], atol=1e-5)  # explicit attention at the storing step
    q1, k1, _ = qkv(seed=1)
    _, _, v2 = qkv(seed=2)
    expected = F.scaled_dot_product_attention(q1, k1, v2)  # step 1's map with step 2's values
    assert torch.allclose(to_heads(outs[2], 4, layout), expected, atol=1e-5)
    assert not torch.allclose(outs[2], fused[2], atol=1e-3)
    assert run.stats.steps_reused == {2, 3} and run.stats.reused == 2 and run.stats.stored == 1
    assert run.cache.bytes_used == 2 * 4 * 64 * 64 * 4


def test_engine_output_mode_returns_stored_output():
    run = AttentionReuseRun(AttentionReuseConfig(mode="output"), parse_bits("1100"))
    outs, fused = drive(run, 4, seeds=[0, 1, 2, 3])
    assert torch.equal(outs[1], fused[1]) and torch.equal(outs[2], fused[1]) and torch.equal(outs[3], fused[1])
    assert run.cache.bytes_used == fused[1].numel() * 4


def test_engine_without_reuse_is_the_fused_path_exactly():
    run = AttentionReuseRun(AttentionReuseConfig(mode="map"), hurry(4, 0))
    outs, fused = drive(run, 4, seeds=[0, 1, 2, 3])
    assert all(o is f for o, f in zip(outs, fused, strict=True))
    assert run.cache.peak_bytes == 0


def test_engine_budget_fallback_and_intermediate_steps():
    run = AttentionReuseRun(AttentionReuseConfig(mode="map", memory_budget_mb=0.01), hurry(3, 1))
    outs, fused = drive(run, 3, seeds=[0, 1, 2])
    assert all(o is f for o, f in zip(outs, fused, strict=True))  # map (128 KiB) over budget: computed every step
    assert run.stats.refused == 1 and run.stats.fallbacks == 1 and run.cache.peak_bytes == 0
    q, k, v = qkv()
    sentinel = torch.zeros(1)
    assert run.attention(lambda: sentinel, q, k, v, heads=4, step=None, layer_key=0, layout="bhnd") is sentinel
    assert run.stats.fresh == 1


def test_engine_fallback_says_why_nothing_was_reused(caplog):
    def call(run, step, seed, nq=64):
        q, k, v = qkv(seed=seed, nq=nq)
        fused_out = F.scaled_dot_product_attention(q, k, v)
        out = run.attention(lambda: fused_out, q, k, v, heads=4, step=step, layer_key=0, layout="bhnd")
        return out, fused_out

    # Step 2 (the source of reuse step 3) never reaches the layer, as when another cache skips it: step 3 must not
    # reuse step 0's older output, and the warning names the missing source step.
    run = AttentionReuseRun(AttentionReuseConfig(mode="output"), parse_bits("1010"))
    call(run, 0, seed=0)
    call(run, 1, seed=1)
    out, fused_out = call(run, 3, seed=3)
    assert out is fused_out and run.stats.fallbacks == 1 and run.stats.reused == 1
    assert "at step 3: the layer stored nothing at step 2" in caplog.text

    caplog.clear()
    run = AttentionReuseRun(AttentionReuseConfig(mode="output"), parse_bits("10"))
    call(run, 0, seed=0)
    out, fused_out = call(run, 1, seed=1, nq=32)  # e.g. a different resolution at the reuse step
    assert out is fused_out and run.stats.fallbacks == 1
    assert "at step 1: its shape does not match this call" in caplog.text


def test_engine_targets_and_chunks():
    run = AttentionReuseRun(AttentionReuseConfig(mode="output", targets="cross"), hurry(2, 1))
    outs, fused = drive(run, 2, seeds=[0, 1], mode_kind="self")
    assert outs[1] is fused[1] and run.stats.untargeted == 2
    run = AttentionReuseRun(AttentionReuseConfig(mode="output"), hurry(2, 1))
    drive(run, 1, seeds=[0], chunk=("cond",))
    outs, fused = drive(run, 2, seeds=[0, 1], chunk=("uncond",))  # uncond stored its own entry at step 0
    assert torch.equal(outs[1], fused[0])
    assert len(run.cache) == 2


def test_engine_reset_drops_state():
    run = AttentionReuseRun(AttentionReuseConfig(mode="output"), hurry(2, 1))
    drive(run, 2, seeds=[0, 1])
    run.reset()
    assert len(run.cache) == 0 and run.stats.reused == 0 and run.stats.layers == set()
    assert "steps reused 0/2" in run.summary(1.0)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("mode", {"mode": "maps"}),
        ("attention", {"targets": "all"}),
        ("memory_budget_mb", {"memory_budget_mb": -1}),
        ("cache_device", {"cache_device": "gpu"}),
    ],
)
def test_config_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        AttentionReuseConfig(**kwargs)


@pytest.mark.parametrize(("layout", "mode"), [("bnc", "map"), ("bhnd", "map"), ("bnc", "output")])
def test_grouped_query_attention_stores_and_reuses_with_query_heads(layout, mode):
    """Fewer K/V heads than query heads (ComfyUI's enable_gqa): maps and outputs have the query's heads."""
    q0, q1 = qkv(h=4, seed=1)[0], qkv(h=4, seed=2)[0]
    (k0, v0), (k1, v1) = (qkv(h=2, seed=s)[1:] for s in (3, 4))

    def fused(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def host(t):
        return from_heads(t, layout)

    run = AttentionReuseRun(AttentionReuseConfig(mode=mode), parse_bits("10"))
    outs = [
        run.attention(lambda q=q, k=k, v=v: host(fused(q, k, v)), host(q), host(k), host(v), heads=4, step=step,
                      layer_key="layer", layout=layout)
        for step, (q, k, v) in enumerate(((q0, k0, v0), (q1, k1, v1)))
    ]  # fmt: skip
    assert run.stats.stored == 1 and run.stats.reused == 1 and run.stats.fallbacks == 0
    assert torch.allclose(outs[0], host(fused(q0, k0, v0)), atol=1e-5)
    expected = fused(q0, k0, v0) if mode == "output" else fused(q0, k0, v1)
    assert torch.allclose(outs[1], host(expected), atol=1e-5)
