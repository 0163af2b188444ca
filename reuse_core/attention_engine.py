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
from dataclasses import dataclass, field, replace

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
from .forecast import ForecastSpec, extrapolate
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
    forecast: ForecastSpec = field(default_factory=ForecastSpec)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"attention: must be one of {', '.join(TARGETS)}, got {self.targets!r}")
        if not self.memory_budget_mb >= 0:
            raise ValueError(f"memory_budget_mb: must be >= 0, got {self.memory_budget_mb}")
        if self.cache_device not in CACHE_DEVICES:
            raise ValueError(f"cache_device: must be one of {', '.join(CACHE_DEVICES)}, got {self.cache_device!r}")
        if self.forecast.order and self.mode != "output":
            # An extrapolated softmax map can have negative weights and rows that no longer sum to one.
            raise ValueError(
                f"forecast: {self.forecast.name} forecasts attention outputs only; set mode to output, or forecast "
                "to reuse to keep map mode"
            )

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_budget_mb * 1024 * 1024)

    def targets_kind(self, kind: str) -> bool:
        return self.targets == "both" or self.targets == kind


class Action(enum.Enum):
    COMPUTE = "compute"  # fused attention, nothing kept
    STORE = "store"  # fused output, and the output (output mode) or the explicit map (map mode) kept
    REUSE = "reuse"


@dataclass
class ReuseStats:
    """Counters of one run, and its warnings: each topic is logged once, later cases are only counted."""

    computed: int = 0
    stored: int = 0
    reused: int = 0
    fallbacks: int = 0  # reuse step without a usable entry: computed instead
    refused: int = 0  # store over budget: not kept
    fresh: int = 0  # intermediate evaluations (step None) and batches that cannot be split by step
    untargeted: int = 0
    forecast_orders: dict[int, int] = field(default_factory=dict)  # forecasting: reused calls per order used
    steps_reused: set[int] = field(default_factory=set)
    layers: set[Hashable] = field(default_factory=set)
    warned: set[str] = field(default_factory=set)

    def warn_once(self, topic: str, message: str) -> None:
        if topic not in self.warned:
            self.warned.add(topic)
            logger.warning(message)


@dataclass(frozen=True)
class AttentionCall:
    """One attention call as the engine sees it: projected q/k/v in ``layout`` and where the call sits."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    heads: int
    layer_key: Hashable
    chunk_key: Hashable = ()
    layout: str = "bnc"
    output_layout: str = "bnc"
    kind: str = "self"  # "self" / "cross"
    mask: torch.Tensor | None = None

    @classmethod
    def of(cls, q, k, v, *, heads, layer_key, chunk_key=(), layout="bnc", output_layout=None, kind=None, mask=None):
        kind = kind or attention_kind(q, k, layout)
        return cls(q, k, v, heads, layer_key, chunk_key, layout, output_layout or layout, kind, mask)

    @property
    def key(self) -> Hashable:
        return (self.chunk_key, self.layer_key)

    def q_heads(self) -> torch.Tensor:
        return to_heads(self.q, self.heads, self.layout)

    def kv_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``k`` or ``v`` as ``[B, heads, N, D]``, grouped-query K/V heads repeated to the query's."""
        return kv_to_heads(t, self.heads, self.q_heads().shape[-1], self.layout)

    def split(self, n: int) -> list[AttentionCall] | None:
        """``n`` calls on equal blocks of rows, or None where the batch (or its mask) cannot be split that way."""
        rows = self.q.shape[0]
        masks = _split_mask(self.mask, n, rows)
        if n == 0 or rows % n or self.k.shape[0] != rows or self.v.shape[0] != rows or masks is None:
            return None
        size = rows // n
        return [
            replace(self, q=self.q[j * size : (j + 1) * size], k=self.k[j * size : (j + 1) * size],
                    v=self.v[j * size : (j + 1) * size], mask=masks[j])
            for j in range(n)
        ]  # fmt: skip


class AttentionReuseRun:
    """State of one sampler run: the plan, the cache and the counters."""

    def __init__(self, config: AttentionReuseConfig, schedule: ReuseSchedule):
        self.config = config
        self.schedule = schedule
        history = config.forecast.history
        store = schedule.store_steps(history)
        self.plan = tuple(
            Action.REUSE if not schedule.computes(i) else Action.STORE if store[i] else Action.COMPUTE
            for i in range(schedule.steps)
        )
        # per step: the compute steps whose attention it uses, oldest first (the last one is itself when it computes)
        self._sources = schedule.sources(history)
        device = "cpu" if config.cache_device == "cpu" else None
        # entries are (call key, step): a forecast keeps several steps of a layer, each counted in the budget
        self.cache = AttentionCache(config.budget_bytes, device=device)
        self.stats = ReuseStats()
        # steps that stored each call key's entries, oldest first: a reuse step may only read what its sources kept
        self._stored_at: dict[Hashable, list[int]] = {}

    def reset(self) -> None:
        self.cache.reset()
        self.stats = ReuseStats()
        self._stored_at = {}

    def action(self, step: int | None) -> Action:
        if step is None or not 0 <= step < len(self.plan):
            return Action.COMPUTE
        return self.plan[step]

    def decide(self, call: AttentionCall, step: int | None) -> Action:
        """What this call does at ``step`` (counted): compute, store or reuse."""
        stats = self.stats
        if step is None:
            stats.fresh += 1
            return Action.COMPUTE
        if not self.config.targets_kind(call.kind):
            stats.untargeted += 1
            return Action.COMPUTE
        stats.layers.add(call.layer_key)
        action = self.action(step)
        if action is Action.COMPUTE:
            stats.computed += 1
        return action

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
        call = AttentionCall.of(q, k, v, heads=heads, layer_key=layer_key, chunk_key=chunk_key, layout=layout,
                                output_layout=output_layout, kind=kind, mask=mask)  # fmt: skip
        return self._carry_out(self.decide(call, step), fused, call, step)

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
        fresh). ``fused_on(q, k, v, mask)`` runs the host's normal attention on any rows of the call. Split, decide
        per block, join: each block follows its own step's schedule bit, in block order, so a block can reuse what
        the block before it just stored, the same decisions as decoding those steps one after the other, at the
        same cache keys. When no block stores or reuses, the whole batch runs as one fused call. A batch that cannot
        be split evenly (or whose mask has another batch size) is computed fresh as a whole, never touching the cache.
        """
        call = AttentionCall.of(q, k, v, heads=heads, layer_key=layer_key, chunk_key=chunk_key, layout=layout,
                                output_layout=output_layout, kind=kind, mask=mask)  # fmt: skip
        blocks = call.split(len(row_steps))
        if blocks is None:
            self.stats.fresh += max(len(row_steps), 1)
            self.stats.warn_once(
                "split",
                f"attention reuse: a {q.shape[0]}-row batch of {len(row_steps)} steps cannot be split by step; "
                "computing its attention fresh (further cases are counted, not logged)",
            )
            return fused_on(q, k, v, mask)
        actions = [self.decide(block, step) for block, step in zip(blocks, row_steps, strict=True)]
        if all(action is Action.COMPUTE for action in actions):
            return fused_on(q, k, v, mask)
        outs = [
            self._carry_out(action, lambda b=block: fused_on(b.q, b.k, b.v, b.mask), block, step)
            for action, block, step in zip(actions, blocks, row_steps, strict=True)
        ]
        return torch.cat(outs, dim=0)

    def _carry_out(self, action: Action, fused: Callable[[], torch.Tensor], call: AttentionCall, step) -> torch.Tensor:
        if action is Action.REUSE:
            out = self._reuse(call, step)
            return fused() if out is None else out
        if action is Action.STORE:
            return self._store(fused, call, step)
        return fused()

    def _store(self, fused, call: AttentionCall, step: int) -> torch.Tensor:
        stats, cache = self.stats, self.cache
        # The step itself returns the host's own attention output, so a store step is exactly the unpatched step
        # whatever the backend; the map is an extra product kept for the reuse steps.
        out = fused()
        # drop what no later step reads (beyond the forecast's history) before the budget check
        previous = self._stored_at.get(call.key, [])
        keep = self.config.forecast.history - 1
        kept = [s for s in previous if s < step][-keep:] if keep else []
        for old in previous:
            if old not in kept:
                cache.discard((call.key, old))
        entry = (call.key, step)
        if self.config.mode == "output":
            stored = cache.put(entry, out)
            while not stored and kept:  # over budget: a shorter history (a lower order) before none at all
                cache.discard((call.key, kept.pop(0)))
                stored = cache.put(entry, out)
        else:
            qh, kh = call.q_heads(), call.kv_heads(call.k)
            nbytes = qh.shape[0] * qh.shape[1] * qh.shape[2] * kh.shape[2] * call.v.element_size()
            stored = cache.fits(nbytes, entry)
            if stored:
                cache.put(entry, attention_map(qh, kh, mask=call.mask, map_dtype=call.v.dtype))
            else:
                cache.refuse(entry)
        if stored:
            stats.stored += 1
            self._stored_at[call.key] = [*kept, step]
        else:
            for old in kept:
                cache.discard((call.key, old))
            self._stored_at.pop(call.key, None)
            stats.refused += 1
            stats.warn_once(
                "budget",
                f"attention reuse: memory budget of {self.config.memory_budget_mb:g} MB "
                f"reached; layers that do not fit compute their attention instead of reusing it",
            )
        return out

    def _reuse(self, call: AttentionCall, step: int) -> torch.Tensor | None:
        """The reused output, or None (counted and explained once) where nothing usable was kept."""
        # An entry kept at an earlier store step is stale when the source step's forward never reached us
        # (another cache such as EasyCache skipped it): compute rather than reuse older attention.
        sources = self._sources[step]
        source = sources[-1]
        stored = self._stored_at.get(call.key, [])
        fresh_entry = bool(stored) and stored[-1] == source
        out = self._reused_output(call, step, sources, stored) if fresh_entry else None
        if out is not None:
            self.stats.reused += 1
            self.stats.steps_reused.add(step)
            return out
        self.stats.fallbacks += 1
        why = (
            "its shape does not match this call"
            if fresh_entry
            else f"the layer stored nothing at step {source} (it did not run there, e.g. encoder propagation "
            "or a step cache skipped it, or its store was refused, see memory_budget_mb)"
        )
        self.stats.warn_once(
            "fallback",
            f"attention reuse: no usable cached {self.config.mode} for a layer at step {step}: {why}; "
            "computing it instead (further fallbacks are counted, not logged)",
        )
        return None

    def _reused_output(self, call: AttentionCall, step: int, sources, stored) -> torch.Tensor | None:
        entry = self.cache.get((call.key, stored[-1]), device=call.v.device)
        if entry is None:
            return None
        vh = call.kv_heads(call.v)
        b, h, nk, d = vh.shape
        nq = token_count(call.q, call.layout)
        if self.config.mode == "output":
            expected = (b, h, nq, d) if call.output_layout == "bhnd" else (b, nq, h * d)
            if tuple(entry.shape) != expected:
                return None
            return self._forecast(call, step, sources, stored) if self.config.forecast.order else entry
        if tuple(entry.shape) != (b, h, nq, nk):
            return None
        return from_heads(reuse_map(entry, vh), call.output_layout)

    def _forecast(self, call: AttentionCall, step: int, sources, stored) -> torch.Tensor:
        """The forecast of this layer's output at ``step`` from the longest run of its sources that was kept."""
        used = 0  # how many of the newest sources are kept, in order
        while used < len(sources) and used < len(stored) and sources[-1 - used] == stored[-1 - used]:
            used += 1
        steps = sources[len(sources) - used :]
        values = [self.cache.get((call.key, s), device=call.v.device) for s in steps]
        order = used - 1
        self.stats.forecast_orders[order] = self.stats.forecast_orders.get(order, 0) + 1
        if order < self.config.forecast.order:
            self.stats.warn_once(
                "order",
                f"attention reuse: forecast {self.config.forecast.name} needs {self.config.forecast.history} "
                f"compute steps before reuse step {step}; it has {used}, so it uses order {order} "
                "(counted in the log line, not repeated)",
            )
        return extrapolate(steps, values, step)

    def summary(self, wall_s: float | None = None) -> str:
        s = self.stats
        mib = self.cache.peak_bytes / 2**20
        parts = [
            f"steps reused {len(s.steps_reused)}/{self.schedule.steps} (schedule {self.schedule})",
            f"layers patched {len(s.layers)}",
            f"{self.config.mode}s memory {mib:.1f} MiB (budget {self.config.memory_budget_mb:g} MB)",
            f"calls reused {s.reused}, stored {s.stored}, computed {s.computed + s.fresh + s.untargeted}",
        ]
        if s.forecast_orders:
            orders = ", ".join(f"order {k}: {v}" for k, v in sorted(s.forecast_orders.items()))
            parts.append(f"forecast {self.config.forecast.name} (calls by order used: {orders})")
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
