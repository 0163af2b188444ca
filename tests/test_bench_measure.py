"""The bench's measurement helpers on workloads whose numbers are known."""

from __future__ import annotations

import torch

from reuse_bench.measure import count_flops, peak_tensor_bytes


def test_peak_tensor_bytes_tracks_live_storage():
    def work():
        a = torch.ones(1000, 1000)  # 4 MB live
        b = a * 2  # 8 MB live: the peak
        del a  # 4 MB
        c = torch.ones(500, 500)  # 5 MB
        view = b.view(-1)  # a view shares b's storage: no new bytes
        del b
        return view.sum() + c.sum()

    _, peak = peak_tensor_bytes(work)
    assert peak == 8_000_000  # the sums' scalars come later, when only 5 MB are live


def test_count_flops_includes_cpu_attention():
    q = torch.randn(2, 4, 64, 16)
    _, flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 2 * 4 * 64 * 64 * 16)  # QK^T and P@V, 2 FLOPs per multiply-add
    _, mm = count_flops(lambda: torch.ones(8, 16) @ torch.ones(16, 4))
    assert mm == 2 * 8 * 16 * 4
