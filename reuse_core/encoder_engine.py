"""Encoder feature propagation engine (Faster Diffusion, Li et al. NeurIPS 2024; TiUE as its one-key limit).

The U-Net *encoder* is the input blocks plus the middle block; the *decoder* is the output blocks plus the
output head. At a full (key) step the whole U-Net runs and the encoder features are cached: every skip
tensor, in the order the input blocks produce them, and the middle-block output. At a decoder-only step the
encoder is skipped and the decoder runs on the cached features with the current step's timestep and
context. Such a decoder never reads the current latent, so the decoders of several future steps can run as
one batch (parallel decoding); their predictions are stored and handed out when the sampler reaches those
steps. The host (not this engine) still turns a prediction into a denoised latent using the current latent.

A diffusion transformer has no encoder/decoder shape; its DiT form (sen-mao/FasterDiffusion-DiT) calls the
leading blocks the encoder (``encoder_block_count``: 18 of DiT-XL/2's 28) and caches the hidden state that
leaves them. The decoder is the remaining blocks and the output head, run on that state with the current
step's timestep and conditioning.

This module is host-agnostic: it never imports ComfyUI or diffusers.

Host interface (``EncoderDecoderHost``)
---------------------------------------
A host adapts one U-Net. All tensors are batch-first; ``B`` is the batch of one model call (e.g. 2 with
classifier-free guidance: uncond and cond rows).

``encode(x, timesteps, context, **extra) -> EncoderFeatures``
    Run the encoder on ``x`` ``[B, ...]`` at ``timesteps`` ``[B]`` with ``context`` (cross-attention
    conditioning, ``[B, tokens, dim]`` or None) and host extras (e.g. SDXL's pooled ``y``); return the skips
    (input-block order) and the middle output, each ``[B, ...]``.
``decode(features, timesteps, context, **extra) -> Tensor``
    Run the decoder on ``features``. Batched over timesteps: ``features``, ``timesteps``, ``context`` and
    every batch-first tensor in ``extra`` come with batch ``n * B`` laid out as ``n`` blocks of ``B`` rows
    (block ``j`` = step ``j`` of the batch), and the result is ``[n * B, ...]`` in the same layout. A decoder
    must treat rows independently (the usual case: convolutions, norms and attention act per sample).
    ``features.steps`` then names the sampling step of each block (``None`` for a single-step decode), so a
    host can tell per-step machinery inside the decoder (e.g. attention reuse) which rows belong to which step.

Optional: ``full_forward(x, timesteps, context, *, capture, **extra) -> (prediction, EncoderFeatures | None)``
    One native forward pass that also returns the features when ``capture`` is True. Hosts whose framework
    already runs the whole U-Net efficiently (ComfyUI) implement it; otherwise the engine calls ``encode``
    then ``decode``.

``EncoderFeatures.meta`` carries host-private data (e.g. the input dtype) through the cache untouched.

Driving the engine
------------------
Per sampler run: ``plan = key_steps.make_plan(spec, steps, window, max_batch)``,
``engine = EncoderPropagationEngine(plan, step_timesteps, parallel)``; then for every model call
``engine.predict(host, x, timesteps, context, step=match_step(sigma, sample_sigmas), cache_key=..., **extra)``;
``engine.reset()`` at the end. ``cache_key`` names the call's cond batch (which conds, in which order, and the
latent shape): features and stored predictions are kept per key, so split cond batches never mix.

Steps and multi-evaluation samplers
-----------------------------------
A call belongs to the step whose start sigma it matches (``exact``) or, for the intermediate evaluations of
heun / dpm_2 / dpmpp_2s / dpmpp_sde / uni_pc, to the step whose sigma interval contains it. A call runs the
whole U-Net iff its step is a full step (or nothing is cached yet for its key); otherwise it runs the decoder
on the cache at its own timestep. Only exact calls at full steps refresh the cache, and only exact calls use
stored parallel predictions, so parallel and sequential decoding give the same result for every sampler,
and with every step a key step every call is a plain full forward.

Adaptive key steps (``PropagationPlan.adaptive_threshold`` set)
---------------------------------------------------------------
No calibration, no fixed list: at the exact call of step ``i`` the engine adds the relative L1 change of the
model input ``mean|x_i - x_(i-1)| / mean|x_(i-1)|`` (per cache key) to a running sum, and step ``i`` is a key step
iff that sum has reached the threshold (the sum then restarts at 0); steps the plan runs in full (step 0, steps
outside the reuse window) are key steps regardless and restart the sum. The input is what every host passes
anyway, so the indicator costs one subtraction per call and no model pass. Threshold 0 makes every step a key step
(the sum is always >= 0), which is the full model bit for bit. Intermediate evaluations of multi-evaluation
samplers follow their step's decision. Parallel decoding cannot apply: the decision for step ``i + 1`` needs the
latent step ``i`` produces, so an adaptive plan has no decoder batches and every decoder-only step decodes alone.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch

from .attention_cache import tensor_bytes
from .forecast import Forecast, ForecastSpec, weighted_sum
from .key_steps import KeyStepSpec, PropagationPlan, make_plan
from .noise_injection import PriorNoiseInjection
from .steps import StepMatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderFeatures:
    """What the decoder needs from the encoder.

    U-Net: the skips (input-block order) and the middle-block output. Transformer (the encoder is the leading
    blocks): ``middle`` is the hidden state after the last encoder block and ``streams`` holds every other tensor
    the remaining blocks read from it (e.g. ``txt`` in double-stream blocks); ``skips`` is empty.
    """

    skips: tuple[torch.Tensor, ...]
    middle: torch.Tensor
    streams: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # Set by the engine on the features of a parallel decoder batch: the step index of each block of rows.
    steps: tuple[int, ...] | None = None

    @property
    def batch_size(self) -> int:
        return self.middle.shape[0]

    def tile(self, n: int) -> EncoderFeatures:
        """``n`` copies along the batch, laid out as ``n`` blocks of the original rows."""
        if n == 1:
            return self
        return EncoderFeatures(
            tuple(tile_batch(s, n) for s in self.skips),
            tile_batch(self.middle, n),
            {name: tile_batch(value, n) for name, value in self.streams.items()},
            self.meta,
        )

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for t in (*self.skips, self.middle, *self.streams.values()))

    @staticmethod
    def weighted_sum(weights: Sequence[float], features: Sequence[EncoderFeatures]) -> EncoderFeatures:
        """The same weighted sum of every tensor (the forecast of a set of key steps' features)."""
        last = features[-1]
        return EncoderFeatures(
            tuple(weighted_sum(weights, [f.skips[i] for f in features]) for i in range(len(last.skips))),
            weighted_sum(weights, [f.middle for f in features]),
            {name: weighted_sum(weights, [f.streams[name] for f in features]) for name in last.streams},
            last.meta,
        )

    @staticmethod
    def cat(blocks: Sequence[EncoderFeatures]) -> EncoderFeatures:
        """The features of several steps as one batch, laid out as blocks of rows in the given order."""
        first = blocks[0]
        return EncoderFeatures(
            tuple(torch.cat([b.skips[i] for b in blocks]) for i in range(len(first.skips))),
            torch.cat([b.middle for b in blocks]),
            {name: torch.cat([b.streams[name] for b in blocks]) for name in first.streams},
            first.meta,
        )


def tile_batch(value: torch.Tensor, n: int) -> torch.Tensor:
    return value.repeat(n, *([1] * (value.ndim - 1)))


def tile_rows(value: Any, n: int, rows: int) -> Any:
    """``value`` tiled ``n`` times if it is batch-first with ``rows`` rows (inside plain lists/tuples too)."""
    if n == 1:
        return value
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows:
        return tile_batch(value, n)
    if type(value) in (list, tuple):
        return type(value)(tile_rows(item, n, rows) for item in value)
    return value


@runtime_checkable
class EncoderDecoderHost(Protocol):
    """The two operations the engine needs from a U-Net (see the module docstring for shapes)."""

    def encode(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None, **extra: Any
    ) -> EncoderFeatures: ...

    def decode(
        self, features: EncoderFeatures, timesteps: torch.Tensor, context: torch.Tensor | None, **extra: Any
    ) -> torch.Tensor: ...


@dataclass
class PropagationStats:
    """What one run did; ``encoder_passes_saved`` counts model calls that skipped the encoder."""

    full_passes: int = 0
    full_steps: set[int] = field(default_factory=set)
    encoder_passes_saved: int = 0
    stored_predictions_used: int = 0
    decoder_batches: int = 0
    decoded_steps: int = 0
    largest_batch: int = 0
    # forecasting (order >= 1): decoded steps per order actually used, and the peak bytes of the kept key-step features
    forecast_orders: dict[int, int] = field(default_factory=dict)
    history_peak_bytes: int = 0

    def count_forecast(self, order: int) -> None:
        self.forecast_orders[order] = self.forecast_orders.get(order, 0) + 1

    def summary(self) -> str:
        calls = self.full_passes + self.encoder_passes_saved
        text = (
            f"key steps {sorted(self.full_steps)}, encoder passes saved {self.encoder_passes_saved}/{calls} calls, "
            f"decoder batches {self.decoder_batches} ({self.decoded_steps} steps decoded, largest batch "
            f"{self.largest_batch}, {self.stored_predictions_used} served from parallel decoding)"
        )
        if self.forecast_orders:
            orders = ", ".join(f"order {k}: {v}" for k, v in sorted(self.forecast_orders.items()))
            text += f", forecasts by order ({orders}), kept features {self.history_peak_bytes / 2**20:.1f} MiB"
        return text


class EncoderPropagationEngine:
    """Per-run state of encoder propagation: feature cache, parallel-decoded predictions, stats."""

    def __init__(
        self,
        plan: PropagationPlan,
        step_timesteps: Sequence[float],
        parallel: bool = True,
        forecast: ForecastSpec | None = None,
    ):
        if len(step_timesteps) < plan.steps:
            raise ValueError(f"step_timesteps: need one timestep per step ({plan.steps}), got {len(step_timesteps)}")
        self.plan = plan
        self.step_timesteps = [float(t) for t in step_timesteps]
        self.parallel = parallel
        self.forecast = forecast or ForecastSpec()
        # the last step that can run decoder-only (an adaptive plan decides each step while sampling)
        self._last_decoded_step = (
            plan.steps - 1
            if plan.adaptive_threshold is not None
            else max((j for j in range(plan.steps) if not plan.is_full(j)), default=-1)
        )
        # per cache key: the last key steps' features (one at order 0, the papers' reuse), forecast at decoded steps
        self._features: dict[Hashable, Forecast[EncoderFeatures]] = {}
        # step whose full pass produced each cache entry: detects key steps that never reached the engine
        self._features_step: dict[Hashable, int] = {}
        self._predictions: dict[tuple[Hashable, int], torch.Tensor] = {}
        # adaptive plans: per cache key the last exact step's input and the change summed since the last key step;
        # per (cache key, step) whether that step refreshes the encoder
        self._last_input: dict[Hashable, torch.Tensor] = {}
        self._change_sum: dict[Hashable, float] = {}
        self._refresh: dict[tuple[Hashable, int], bool] = {}
        self._warned: set[str] = set()
        self.stats = PropagationStats()

    def reset(self) -> None:
        self._features.clear()
        self._features_step.clear()
        self._predictions.clear()
        self._last_input.clear()
        self._change_sum.clear()
        self._refresh.clear()
        self._warned.clear()
        self.stats = PropagationStats()

    def observe_input(self, step: StepMatch | None, cache_key: Hashable, x: torch.Tensor) -> None:
        """Adaptive plans: decide at the exact call of ``step`` whether it is a key step (rule in the docstring)."""
        threshold = self.plan.adaptive_threshold
        if threshold is None or step is None or not step.exact:
            return
        previous = self._last_input.get(cache_key)
        if previous is None or previous.shape != x.shape:
            change = float("inf")  # nothing to compare with: refresh
        else:
            change = float((x - previous).abs().mean() / (previous.abs().mean() + 1e-12))
        total = self._change_sum.get(cache_key, 0.0) + change
        refresh = self.plan.is_full(step.index) or total >= threshold
        self._refresh[(cache_key, step.index)] = refresh
        self._change_sum[cache_key] = 0.0 if refresh else total
        self._last_input[cache_key] = x.detach().clone()

    # Decisions ---------------------------------------------------------------------------------------
    def needs_full_pass(self, step: StepMatch | None, cache_key: Hashable) -> bool:
        if step is None or cache_key not in self._features:
            return True
        # A planned full step between the cached features and now was skipped before reaching the engine
        # (an outer cache such as EasyCache returned early): refresh now rather than decode from older features.
        since = self._features_step.get(cache_key, -1)
        if self.plan.is_full(step.index) or any(self.plan.is_full(i) for i in range(since + 1, step.index)):
            return True
        if self.plan.adaptive_threshold is not None:
            return self._refresh.get((cache_key, step.index), True)  # a step never decided runs in full
        return False

    def wants_features(self, step: StepMatch | None, cache_key: Hashable) -> bool:
        """Should a full pass at ``step`` keep its features? Only if a decoder-only step can follow from it."""
        if step is None:
            return False
        if not step.exact and cache_key in self._features:
            return False  # intermediate evaluations never replace the key step's cache
        if self.forecast.order and self._decoded_later(step.index):
            return True  # a forecast reads earlier key steps too, not only the last one before a decoded step
        return not self.plan.is_full(step.index + 1) or not self.plan.is_full(step.index)

    def _decoded_later(self, step: int) -> bool:
        return step < self._last_decoded_step

    # Bookkeeping after a full pass -------------------------------------------------------------------
    def record_full_pass(self, step: StepMatch | None, cache_key: Hashable, features: EncoderFeatures | None) -> None:
        self.stats.full_passes += 1
        if step is None:
            return
        if step.exact:
            self.stats.full_steps.add(step.index)
        if step.exact or cache_key not in self._features:
            for stale in [k for k in self._predictions if k[0] == cache_key]:
                del self._predictions[stale]
            if features is None:
                self._features.pop(cache_key, None)
                self._features_step.pop(cache_key, None)
            else:
                history = self._features.setdefault(
                    cache_key, Forecast(self.forecast.order, EncoderFeatures.weighted_sum)
                )
                if not step.exact:
                    history.clear()  # an intermediate evaluation's features only stand in until a key step
                history.push(step.index, features)
                self._features_step[cache_key] = step.index
                if self.forecast.order:
                    kept = sum(f.nbytes for h in self._features.values() for f in h.values)
                    self.stats.history_peak_bytes = max(self.stats.history_peak_bytes, kept)

    def cached_features(self, cache_key: Hashable) -> EncoderFeatures | None:
        """The last key step's features kept for ``cache_key`` (None when nothing is kept)."""
        history = self._features.get(cache_key)
        return history.values[-1] if history else None

    def _features_at(self, cache_key: Hashable, step: int) -> EncoderFeatures:
        """The features a decoder-only ``step`` runs on: the last key step's, or their forecast at ``step``."""
        history = self._features[cache_key]
        if not self.forecast.order:
            return history.values[-1]
        used = history.order_used()
        self.stats.count_forecast(used)
        if used < self.forecast.order and "order" not in self._warned:
            self._warned.add("order")
            logger.info(
                "Encoder Feature Propagation: forecast %s needs %d key steps before a decoded step; step %d has %d, "
                "so it uses order %d (counted in the log line; not repeated this run)",
                self.forecast.name, self.forecast.history, step, len(history), used,
            )
        return history.at(step)

    # Decoder-only steps ------------------------------------------------------------------------------
    def decode_step(
        self,
        host: EncoderDecoderHost,
        step: StepMatch,
        cache_key: Hashable,
        timesteps: torch.Tensor,
        context: torch.Tensor | None,
        *,
        batchable: bool = True,
        **extra: Any,
    ) -> torch.Tensor:
        """Prediction at a decoder-only step from the cached features (stored, sequential or batched)."""
        self.stats.encoder_passes_saved += 1
        if step.exact and batchable:
            stored = self._predictions.get((cache_key, step.index))
            if stored is not None:
                self.stats.stored_predictions_used += 1
                return stored.clone()
        batch = self.plan.batch_from(step.index) if (step.exact and self.parallel and batchable) else (step.index,)
        self.stats.decoder_batches += 1
        self.stats.decoded_steps += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        if len(batch) == 1:
            return host.decode(self._features_at(cache_key, step.index), timesteps, context, **extra)
        n, rows = len(batch), self._features[cache_key].values[-1].batch_size
        if timesteps.shape[0] != rows:
            raise ValueError(f"timesteps: expected one per row of the cached batch ({rows}), got {timesteps.shape[0]}")
        # The current step uses the call's own timesteps; later steps use the schedule's (same values).
        all_timesteps = torch.cat([timesteps] + [torch.full_like(timesteps, self.step_timesteps[j]) for j in batch[1:]])
        batched_extra = {name: tile_rows(value, n, rows) for name, value in extra.items()}
        if self.forecast.order:  # each decoded step gets its own forecast
            stacked = EncoderFeatures.cat([self._features_at(cache_key, j) for j in batch])
        else:
            stacked = self._features_at(cache_key, step.index).tile(n)
        tiled = replace(stacked, steps=tuple(batch))
        out = host.decode(tiled, all_timesteps, tile_rows(context, n, rows), **batched_extra)
        chunks = out.split(rows)
        if len(chunks) != n:
            raise RuntimeError(f"host decode returned batch {out.shape[0]}, expected {n * rows}")
        for j, chunk in zip(batch[1:], chunks[1:], strict=True):
            self._predictions[(cache_key, j)] = chunk
        return chunks[0]

    # One model call ----------------------------------------------------------------------------------
    def predict(
        self,
        host: EncoderDecoderHost,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None,
        *,
        step: StepMatch | None,
        cache_key: Hashable,
        batchable: bool = True,
        **extra: Any,
    ) -> torch.Tensor:
        """The model prediction for one call: a full pass or a decoder-only pass, as the plan says.

        ``batchable=False`` decodes this call's own step only, with this call's inputs: it neither launches a
        parallel batch nor uses a stored prediction (for per-step inputs a batch cannot carry, such as ControlNet
        output residuals).
        """
        self.observe_input(step, cache_key, x)
        if not self.needs_full_pass(step, cache_key):
            return self.decode_step(host, step, cache_key, timesteps, context, batchable=batchable, **extra)
        capture = self.wants_features(step, cache_key)
        full_forward = getattr(host, "full_forward", None)
        if full_forward is not None:
            out, features = full_forward(x, timesteps, context, capture=capture, **extra)
        else:
            features = host.encode(x, timesteps, context, **extra)
            out = host.decode(features, timesteps, context, **extra)
        self.record_full_pass(step, cache_key, features if capture else None)
        return out


# Faster Diffusion's DiT form (sen-mao/FasterDiffusion-DiT): DiT-XL/2's first 18 of 28 blocks are the encoder.
DIT_PAPER_ENCODER_FRACTION = 18 / 28


def check_encoder_fraction(fraction: float) -> float:
    """``fraction`` if it can split a transformer (strictly between 0 and 1), else a ValueError naming the input."""
    f = fraction
    if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 < f < 1.0:
        raise ValueError(
            f"encoder_fraction: the share of a transformer's blocks that form the encoder must lie strictly "
            f"between 0 and 1 (paper: 18/28 = {DIT_PAPER_ENCODER_FRACTION:.3f}), got {f!r}"
        )
    return float(f)


def encoder_block_count(fraction: float, depth: int) -> int:
    """How many of a transformer's ``depth`` leading blocks form the encoder: ``fraction`` of them, rounded, with
    at least one block on each side of the split."""
    if depth < 2:
        raise ValueError(f"a transformer with {depth} block(s) cannot be split into an encoder and a decoder")
    return min(max(round(fraction * depth), 1), depth - 1)


@dataclass(frozen=True)
class EncoderPropagationConfig:
    """Validated user settings of encoder propagation (host-independent).

    ``encoder_fraction`` applies to transformers only (a U-Net's encoder is its input and middle blocks).
    """

    key_steps: KeyStepSpec = field(default_factory=KeyStepSpec)
    parallel_decoding: bool = True
    max_decoders_per_batch: int = 4
    start_percent: float = 0.0
    end_percent: float = 1.0
    injection: PriorNoiseInjection = field(default_factory=PriorNoiseInjection)
    encoder_fraction: float = DIT_PAPER_ENCODER_FRACTION
    forecast: ForecastSpec = field(default_factory=ForecastSpec)

    def __post_init__(self):
        check_encoder_fraction(self.encoder_fraction)
        m = self.max_decoders_per_batch
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"max_decoders_per_batch: must be an integer >= 1, got {m!r}")
        for name in ("start_percent", "end_percent"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: must lie in 0..1, got {value!r}")
        if self.start_percent >= self.end_percent:
            raise ValueError(
                f"start_percent ({self.start_percent}) must be below end_percent ({self.end_percent}); "
                "reuse happens only between them"
            )

    def plan(self, steps: int, window: Sequence[bool] | None = None) -> PropagationPlan:
        return make_plan(self.key_steps, steps, window, self.max_decoders_per_batch)
