"""Measurements for the bench: wall time, U-Net FLOPs and peak tensor memory of one sampling run.

* Wall time: ``time.perf_counter`` around a whole sampling run; the bench reports medians of repeats.
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over a whole run, with CPU scaled-dot-product
  attention added (PyTorch's table counts it only for the CUDA kernels): ``4 * B * H * Nq * Nk * D``.
* Peak memory: ``PeakTensorMemory``, a dispatch mode that tracks the storage of every tensor an aten op
  returns during the run and reports the peak of live bytes allocated in it (weights and tensors made
  before the run are not counted; temporary buffers inside a fused kernel are invisible to it). Unlike
  process RSS it is deterministic and not blurred by the allocator, which is why it is used here.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, nq, d = query_shape
    nk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * nq * nk * d + 2 * b * h * nq * nk * dv


def count_flops(fn: Callable[[], object]) -> tuple[object, int]:
    """``(fn(), total FLOPs)``."""
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storage allocated (and still alive) while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}  # storage data_ptr -> [nbytes, live tensor count]

    def _release(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[ptr]

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        if id(t) in inputs:
            return  # in-place op returning its input
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0:
            return
        entry = self._refs.get(ptr)
        if entry is None:
            entry = self._refs[ptr] = [storage.nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in args if isinstance(a, torch.Tensor)}
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and not value.is_meta:
                self._track(value, inputs)
        return out


def peak_tensor_bytes(fn: Callable[[], object]) -> tuple[object, int]:
    with PeakTensorMemory() as mode:
        result = fn()
    return result, mode.peak


def wall_time(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start
