"""Byte-budgeted store for attention maps or attention outputs, one per (chunk, layer) key.

Keys are tuples chosen by the host; the engine uses ``(chunk_key, layer_key)`` where ``chunk_key``
identifies the batch chunk (for ComfyUI the cond UUIDs of the chunk, so cond/uncond and split batches never
mix) and ``layer_key`` the attention call inside one model forward. One cache belongs to one sampler run of
one patched model, so several patched models never share entries.

A store that would push the total over the budget is refused: ``put`` returns False, drops the stale entry
of that key (a later reuse must then compute instead of reading an older step's tensor) and counts the
refusal. The cache never allocates past its budget, so the caller can fall back to computing instead of
running out of memory. ``fits(nbytes, key)`` lets the caller check before it pays for materialising a map.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class AttentionCache:
    """``device=None`` keeps tensors where they were produced (same device as the model)."""

    def __init__(self, budget_bytes: int, device: torch.device | str | None = None):
        if budget_bytes < 0:
            raise ValueError(f"memory budget: must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.device = torch.device(device) if device is not None else None
        self._entries: dict[Hashable, torch.Tensor] = {}
        self.bytes_used = 0
        self.peak_bytes = 0
        self.refused = 0
        self.stored = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def fits(self, nbytes: int, key: Hashable | None = None) -> bool:
        """Would storing ``nbytes`` under ``key`` (replacing its entry) stay within the budget?"""
        replaced = tensor_bytes(self._entries[key]) if key in self._entries else 0
        return self.bytes_used - replaced + nbytes <= self.budget_bytes

    def put(self, key: Hashable, tensor: torch.Tensor) -> bool:
        """Store ``tensor`` (detached, moved to the cache device); False if it would exceed the budget."""
        nbytes = tensor_bytes(tensor)
        if not self.fits(nbytes, key):
            self.refuse(key)
            return False
        self.discard(key)
        stored = tensor.detach()
        if self.device is not None and stored.device != self.device:
            stored = stored.to(self.device)
        self._entries[key] = stored
        self.bytes_used += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes_used)
        self.stored += 1
        return True

    def refuse(self, key: Hashable) -> None:
        """Record a store that was not made (over budget) and drop the key's stale entry."""
        self.discard(key)
        self.refused += 1

    def get(self, key: Hashable, device: torch.device | str | None = None) -> torch.Tensor | None:
        tensor = self._entries.get(key)
        if tensor is not None and device is not None and tensor.device != torch.device(device):
            tensor = tensor.to(device)
        return tensor

    def discard(self, key: Hashable) -> None:
        tensor = self._entries.pop(key, None)
        if tensor is not None:
            self.bytes_used -= tensor_bytes(tensor)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes_used = 0

    def reset(self) -> None:
        """Drop every entry and the counters (a new run)."""
        self.clear()
        self.peak_bytes = 0
        self.refused = 0
        self.stored = 0
