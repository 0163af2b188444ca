"""Explicit softmax attention that also returns its map, and the reuse product ``P @ V``.

Layouts: ``"bnc"`` is ``[B, N, heads * dim_head]`` (ComfyUI's default, diffusers after ``to_q``),
``"bhnd"`` is ``[B, heads, N, dim_head]`` (ComfyUI ``skip_reshape=True``: Flux, Mochi, ...).

Explicit attention costs far more than a fused kernel (measured on 2 CPU cores, B=2, 8 heads, 4096 tokens:
fused SDPA 304 ms, explicit softmax 1227 ms, ``P @ V`` 186 ms), so hosts call it only at a compute step whose
map a later step reuses.
"""

from __future__ import annotations

import torch

LAYOUTS = ("bnc", "bhnd")


def to_heads(t: torch.Tensor, heads: int, layout: str) -> torch.Tensor:
    """``[B, H, N, D]`` view of ``t``."""
    if layout == "bhnd":
        return t
    if layout != "bnc":
        raise ValueError(f"layout: must be one of {LAYOUTS}, got {layout!r}")
    # Some hosts hand [B, N, H, D] for "bnc" (SD3's value tensor); ComfyUI's backends accept it too.
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def kv_to_heads(t: torch.Tensor, heads: int, dim_head: int, layout: str) -> torch.Tensor:
    """``[B, heads, N, D]`` view of a key or value tensor. Grouped-query attention (ComfyUI's ``enable_gqa``)
    hands fewer K/V heads than query heads: each K/V head serves ``heads // kv_heads`` consecutive query heads,
    as in ComfyUI's ``repeat_kv_for_gqa`` and PyTorch's SDPA."""
    if layout == "bnc":
        t = t.reshape(t.shape[0], t.shape[1], -1, dim_head).transpose(1, 2)
    else:
        t = to_heads(t, heads, layout)
    kv_heads = t.shape[1]
    if kv_heads != heads:
        if heads % kv_heads:
            raise ValueError(f"grouped-query attention: {heads} query heads are not a multiple of {kv_heads} K/V heads")
        t = t.repeat_interleave(heads // kv_heads, dim=1)
    return t


def token_count(t: torch.Tensor, layout: str) -> int:
    """Sequence length of a ``layout`` tensor (``bnc``: ``[B, N, C]``, ``bhnd``: ``[B, H, N, D]``)."""
    return t.shape[2] if layout == "bhnd" else t.shape[1]


def attention_kind(q: torch.Tensor, k: torch.Tensor, layout: str) -> str:
    """``"self"`` when queries and keys have the same length, else ``"cross"`` (text tokens as keys)."""
    return "self" if token_count(q, layout) == token_count(k, layout) else "cross"


def from_heads(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``[B, H, N, D]`` back to ``layout``."""
    if layout == "bhnd":
        return t
    if layout != "bnc":
        raise ValueError(f"layout: must be one of {LAYOUTS}, got {layout!r}")
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _broadcast_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask


def attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    map_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The softmax attention map ``[B, H, Nq, Nk]`` of ``[B, H, N, D]`` queries and keys.

    Scores and softmax run in float32 (as ComfyUI does with upcast attention) one batch row at a time, so
    the transient float32 scores stay at one row's size; the map is kept in ``map_dtype`` (default: the
    dtype of ``q``). ``mask`` is boolean (True = attend) or additive, broadcastable to ``[B, H, Nq, Nk]``.
    """
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    probs = torch.empty((b, h, nq, nk), dtype=map_dtype or q.dtype, device=q.device)
    if mask is not None:
        mask = _additive_mask(_broadcast_mask(mask), torch.float32).expand(b, h, nq, nk)
    for row in range(b):
        scores = torch.matmul(q[row].float(), k[row].float().transpose(-1, -2)).mul_(scale)
        if mask is not None:
            scores.add_(mask[row])
        probs[row] = torch.softmax(scores, dim=-1)
        del scores
    return probs


def attention_with_map(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B,H,Nq,D], probs [B,H,Nq,Nk])``: explicit softmax attention and its map (``attention_map``)."""
    probs = attention_map(q, k, mask=mask, map_dtype=v.dtype)
    return reuse_map(probs, v), probs


def reuse_map(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``probs @ v`` in ``v``'s dtype: the output of attention with a given map and fresh values."""
    return torch.matmul(probs.to(device=v.device, dtype=v.dtype), v)
