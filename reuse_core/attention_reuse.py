"""Attention reuse engine: per-run state and the per-call decision, independent of any host.

A host (the ComfyUI node, a diffusers attention processor, ...) creates one ``AttentionReuseRun`` per
sampler run and routes every attention call through ``AttentionReuseRun.attention``. The engine decides
from the step's schedule bit whether to run the host's own fused attention, run it and keep what a later
step needs, or reuse.

Host API
--------
::

    config = AttentionReuseConfig(mode="map", targets="both", memory_budget_mb=2048, cache_device="model")
    run = AttentionReuseRun(config, schedule)          # schedule: reuse_core.schedules.ReuseSchedule
    ...
    # inside the host's attention, for every call:
    out = run.attention(
        fused,                  # zero-arg callable: the host's normal attention on these q/k/v, returns
                                # the output in output_layout (only called when the engine needs it)
        q, k, v,                # projected tensors in `layout`
        heads=heads,
        step=step,              # index of the sampling step this call belongs to, or None for an evaluation
                                # that is not a step's own (intermediate evaluation of a multi-eval sampler):
                                # such calls always compute fresh and never touch the cache
        layer_key=layer_key,    # hashable, identifies this attention layer within one model forward
        chunk_key=chunk_key,    # hashable, identifies the batch chunk (e.g. cond vs uncond UUIDs)
        layout="bnc",           # "bnc" = [B, N, H*D], "bhnd" = [B, H, N, D]
        output_layout="bnc",    # layout `fused()` returns and the engine must return
        kind=None,              # "self" / "cross", or None: self when q and k have the same token count
        mask=None,              # optional attention mask (bool True = attend, or additive)
    )
    # a call whose batch holds several steps (equal blocks of rows, e.g. a parallel decoder batch of
    # encoder propagation): each block follows its own step's bit, see ``attention_steps``
    out = run.attention_steps(fused_on, q, k, v, heads=heads, row_steps=(5, 6, 7), layer_key=..., ...)
    ...
    line = run.summary(wall_s)                         # one log line for the run
    run.reset()                                        # drop maps; ready for another run

Per step (``ReuseSchedule``): a reuse step (bit 0) returns ``P_cached @ V`` (``mode="map"``) or the cached
output (``mode="output"``) for targeted layers; a compute step that a reuse step follows (``store_steps``)
keeps the map (explicit softmax, ``attention_math.attention_map``, next to the host's own output) or the fused
output; any other compute step just calls ``fused()``. A missing or mismatched cache entry (new chunk
composition, changed shape, over-budget store) falls back to ``fused()``; budget refusals are logged once per
run. With no reuse step in the schedule every call is ``fused()``, so the output is bit-identical to the unpatched host.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from .attention_cache import AttentionCache
from .attention_math import (
    attention_kind,
    attention_map,
    from_heads,
    kv_to_heads,
    reuse_map,
    to_heads,
    token_count,
)
from .schedules import ReuseSchedule

logger = logging.getLogger(__name__)

MODES = ("map", "output")
TARGETS = ("both", "self", "cross")
CACHE_DEVICES = ("model", "cpu")


@dataclass(frozen=True)
class AttentionReuseConfig:
    """``mode``: reuse the attention map (paper) or the attention output (cheaper, PAB/T-GATE style).
    ``targets``: which attention layers reuse. ``cache_device``: "model" keeps tensors where they were made."""

    mode: str = "map"
    targets: str = "both"
    memory_budget_mb: float = 2048.0
    cache_device: str = "model"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"attention: must be one of {', '.join(TARGETS)}, got {self.targets!r}")
        if not self.memory_budget_mb >= 0:
            raise ValueError(f"memory_budget_mb: must be >= 0, got {self.memory_budget_mb}")
        if self.cache_device not in CACHE_DEVICES:
            raise ValueError(f"cache_device: must be one of {', '.join(CACHE_DEVICES)}, got {self.cache_device!r}")

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_budget_mb * 1024 * 1024)

    def targets_kind(self, kind: str) -> bool:
        return self.targets == "both" or self.targets == kind


class Action(enum.Enum):
    COMPUTE = "compute"  # fused attention, nothing kept
    STORE = "store"  # fused output kept (output mode) or explicit map kept (map mode)
    REUSE = "reuse"


@dataclass
class ReuseStats:
    computed: int = 0
    stored: int = 0
    reused: int = 0
    fallbacks: int = 0  # reuse step without a usable entry: computed instead
    refused: int = 0  # store over budget: not kept
    fresh: int = 0  # intermediate evaluations (step None)
    untargeted: int = 0
    steps_reused: set[int] = field(default_factory=set)
    layers: set[Hashable] = field(default_factory=set)


class AttentionReuseRun:
    """State of one sampler run: the plan, the cache and the counters."""

    def __init__(self, config: AttentionReuseConfig, schedule: ReuseSchedule):
        self.config = config
        self.schedule = schedule
        store = schedule.store_steps()
        self.plan = tuple(
            Action.REUSE if not schedule.computes(i) else Action.STORE if store[i] else Action.COMPUTE
            for i in range(schedule.steps)
        )
        # per step: the compute step whose attention it uses (itself when it computes)
        self._sources = tuple(schedule.source_step(i) for i in range(schedule.steps))
        device = "cpu" if config.cache_device == "cpu" else None
        self.cache = AttentionCache(config.budget_bytes, device=device)
        self.stats = ReuseStats()
        self._warned: set[str] = set()
        # step that stored each cache entry: a reuse step may only read what its schedule source step kept
        self._stored_at: dict[Hashable, int] = {}

    def reset(self) -> None:
        self.cache.reset()
        self.stats = ReuseStats()
        self._warned = set()
        self._stored_at = {}

    def action(self, step: int | None) -> Action:
        if step is None or not 0 <= step < len(self.plan):
            return Action.COMPUTE
        return self.plan[step]

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning(message)

    def attention(
        self,
        fused: Callable[[], torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        heads: int,
        step: int | None,
        layer_key: Hashable,
        chunk_key: Hashable = (),
        layout: str = "bnc",
        output_layout: str | None = None,
        kind: str | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        output_layout = output_layout or layout
        stats = self.stats
        if step is None:
            stats.fresh += 1
            return fused()
        if kind is None:
            kind = attention_kind(q, k, layout)
        if not self.config.targets_kind(kind):
            stats.untargeted += 1
            return fused()
        stats.layers.add(layer_key)
        action = self.action(step)
        key = (chunk_key, layer_key)
        if action is Action.COMPUTE:
            stats.computed += 1
            return fused()
        if action is Action.REUSE:
            # An entry kept at an earlier store step is stale when the source step's forward never reached us
            # (another cache such as EasyCache skipped it): compute rather than reuse older attention.
            source = self._sources[step]
            fresh_entry = self._stored_at.get(key) == source
            out = self._reuse(key, q, k, v, heads, layout, output_layout) if fresh_entry else None
            if out is not None:
                stats.reused += 1
                stats.steps_reused.add(step)
                return out
            stats.fallbacks += 1
            why = (
                "its shape does not match this call"
                if fresh_entry
                else f"the layer stored nothing at step {source} (it did not run there, e.g. encoder propagation "
                "or a step cache skipped it, or its store was refused, see memory_budget_mb)"
            )
            self._warn_once(
                "fallback",
                f"attention reuse: no usable cached {self.config.mode} for a layer at step {step}: {why}; "
                "computing it instead (further fallbacks are counted, not logged)",
            )
            return fused()
        return self._store(fused, key, step, q, k, v, heads, layout, mask)

    def attention_steps(
        self,
        fused_on: Callable[..., torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        heads: int,
        row_steps: Sequence[int | None],
        layer_key: Hashable,
        chunk_key: Hashable = (),
        layout: str = "bnc",
        output_layout: str | None = None,
        kind: str | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One attention call whose batch holds several sampling steps (a parallel decoder batch).

        The rows are ``len(row_steps)`` equal blocks, block ``j`` at step ``row_steps[j]`` (None: unknown, computed
        fresh). ``fused_on(q, k, v, mask)`` runs the host's normal attention on any rows of the call. Each block
        follows its own step's schedule bit, in block order, so a block can reuse what the block before it just
        stored: the same decisions as decoding those steps one after the other, at the same cache keys. When no
        block stores or reuses, the whole batch runs as one fused call. A batch that cannot be split evenly (or
        whose mask has another batch size) is computed fresh as a whole and never touches the cache.
        """
        output_layout = output_layout or layout
        stats = self.stats
        n, rows = len(row_steps), q.shape[0]
        whole = (q, k, v, mask)
        if n == 1:
            return self.attention(
                lambda: fused_on(*whole),
                q,
                k,
                v,
                heads=heads,
                step=row_steps[0],
                layer_key=layer_key,
                chunk_key=chunk_key,
                layout=layout,
                output_layout=output_layout,
                kind=kind,
                mask=mask,
            )
        masks = _split_mask(mask, n, rows)
        if n == 0 or rows % n or k.shape[0] != rows or v.shape[0] != rows or masks is None:
            stats.fresh += max(n, 1)
            self._warn_once(
                "split",
                f"attention reuse: a {rows}-row batch of {n} steps cannot be split by step; computing its "
                "attention fresh (further cases are counted, not logged)",
            )
            return fused_on(*whole)
        if kind is None:
            kind = attention_kind(q, k, layout)
        if not self.config.targets_kind(kind):
            stats.untargeted += n
            return fused_on(*whole)
        if all(step is None or self.action(step) is Action.COMPUTE for step in row_steps):
            for step in row_steps:
                if step is None:
                    stats.fresh += 1
                else:
                    stats.computed += 1
                    stats.layers.add(layer_key)
            return fused_on(*whole)
        size = rows // n
        outs = []
        for j, step in enumerate(row_steps):
            part = (*(t[j * size : (j + 1) * size] for t in (q, k, v)), masks[j])
            outs.append(
                self.attention(
                    lambda part=part: fused_on(*part),
                    *part[:3],
                    heads=heads,
                    step=step,
                    layer_key=layer_key,
                    chunk_key=chunk_key,
                    layout=layout,
                    output_layout=output_layout,
                    kind=kind,
                    mask=part[3],
                )
            )
        return torch.cat(outs, dim=0)

    def _store(self, fused, key, step, q, k, v, heads, layout, mask) -> torch.Tensor:
        stats, cache = self.stats, self.cache
        if self.config.mode == "output":
            out = fused()
            stored = cache.put(key, out)
        else:
            qh = to_heads(q, heads, layout)
            kh = kv_to_heads(k, heads, qh.shape[-1], layout)
            nbytes = qh.shape[0] * qh.shape[1] * qh.shape[2] * kh.shape[2] * v.element_size()
            stored = cache.fits(nbytes, key)
            # The step itself keeps the host's own attention output, so a store step is exactly the unpatched
            # step whatever the backend; the map is an extra product kept for the reuse steps.
            out = fused()
            if stored:
                cache.put(key, attention_map(qh, kh, mask=mask, map_dtype=v.dtype))
            else:
                cache.refuse(key)
        if stored:
            stats.stored += 1
            self._stored_at[key] = step
        else:
            self._stored_at.pop(key, None)
            stats.refused += 1
            self._warn_once(
                "budget",
                f"attention reuse: memory budget of {self.config.memory_budget_mb:g} MB "
                f"reached; layers that do not fit compute their attention instead of reusing it",
            )
        return out

    def _reuse(self, key, q, k, v, heads, layout, output_layout) -> torch.Tensor | None:
        entry = self.cache.get(key, device=v.device)
        if entry is None:
            return None
        vh = kv_to_heads(v, heads, to_heads(q, heads, layout).shape[-1], layout)
        b, h, nk, d = vh.shape
        nq = token_count(q, layout)
        if self.config.mode == "output":
            expected = (b, h, nq, d) if output_layout == "bhnd" else (b, nq, h * d)
            return entry if tuple(entry.shape) == expected else None
        if tuple(entry.shape) != (b, h, nq, nk):
            return None
        return from_heads(reuse_map(entry, vh), output_layout)

    def summary(self, wall_s: float | None = None) -> str:
        s = self.stats
        mib = self.cache.peak_bytes / 2**20
        parts = [
            f"steps reused {len(s.steps_reused)}/{self.schedule.steps} (schedule {self.schedule})",
            f"layers patched {len(s.layers)}",
            f"{self.config.mode}s memory {mib:.1f} MiB (budget {self.config.memory_budget_mb:g} MB)",
            f"calls reused {s.reused}, stored {s.stored}, computed {s.computed + s.fresh + s.untargeted}",
        ]
        if s.fallbacks or s.refused:
            parts.append(f"fallbacks {s.fallbacks}, refused stores {s.refused}")
        if wall_s is not None:
            parts.append(f"wall {wall_s:.2f} s")
        return "Attention Map Reuse: " + ", ".join(parts)


def _split_mask(mask: torch.Tensor | None, n: int, rows: int) -> list[torch.Tensor | None] | None:
    """The mask of each of ``n`` row blocks, or None when the mask's batch cannot be split that way."""
    if mask is None or mask.ndim < 3 or mask.shape[0] == 1:
        return [mask] * n  # shared by every row
    if mask.shape[0] != rows or n == 0 or rows % n:
        return None
    size = rows // n
    return [mask[j * size : (j + 1) * size] for j in range(n)]
