import pytest
import torch

from reuse_core.attention_cache import AttentionCache, tensor_bytes


def test_keys_never_mix():
    cache = AttentionCache(budget_bytes=10_000)
    cond, uncond = torch.ones(4, 4), torch.zeros(4, 4)
    assert cache.put((("cond",), 0), cond)
    assert cache.put((("uncond",), 0), uncond)
    assert cache.put((("cond",), 1), cond * 2)
    assert torch.equal(cache.get((("cond",), 0)), cond)
    assert torch.equal(cache.get((("uncond",), 0)), uncond)
    assert torch.equal(cache.get((("cond",), 1)), cond * 2)
    assert cache.get((("cond", "uncond"), 0)) is None  # another chunk composition is another key
    assert len(cache) == 3 and cache.bytes_used == 3 * 64


def test_budget_refuses_and_never_exceeds():
    entry = torch.zeros(16, dtype=torch.float32)  # 64 bytes
    cache = AttentionCache(budget_bytes=150)
    assert cache.put("a", entry) and cache.put("b", entry)
    assert not cache.put("c", entry)
    assert cache.refused == 1 and "c" not in cache and cache.bytes_used == 128 <= cache.budget_bytes
    assert cache.peak_bytes <= cache.budget_bytes


def test_replacing_counts_only_the_difference_and_refusal_drops_stale_entry():
    cache = AttentionCache(budget_bytes=100)
    assert cache.put("a", torch.zeros(16))  # 64 bytes
    assert cache.fits(64, "a") and not cache.fits(64, "b")
    assert cache.put("a", torch.ones(20))  # 80 bytes replaces 64
    assert cache.bytes_used == 80
    assert not cache.put("a", torch.ones(40))  # 160 bytes: refused, the old "a" is stale and dropped
    assert "a" not in cache and cache.bytes_used == 0


def test_zero_budget_stores_nothing():
    cache = AttentionCache(budget_bytes=0)
    assert not cache.put("a", torch.zeros(1))
    assert cache.bytes_used == 0 and cache.refused == 1


def test_cpu_cache_device_and_get_to_device():
    cache = AttentionCache(budget_bytes=1 << 20, device="cpu")
    t = torch.randn(3, 3, dtype=torch.float16)
    cache.put("k", t)
    got = cache.get("k", device="cpu")
    assert got.device.type == "cpu" and got.dtype == torch.float16 and torch.equal(got, t)
    assert cache.bytes_used == tensor_bytes(t) == 18


def test_reset_clears_entries_and_counters():
    cache = AttentionCache(budget_bytes=64)
    cache.put("a", torch.zeros(16))
    cache.put("b", torch.zeros(16))
    cache.reset()
    assert len(cache) == 0 and cache.bytes_used == 0 and cache.peak_bytes == 0 and cache.refused == 0


def test_negative_budget_rejected():
    with pytest.raises(ValueError, match="budget"):
        AttentionCache(budget_bytes=-1)
