"""The DiT rows of the bench: every method as a ``DiTPredictor`` factory on the built-in DiT.

Mirrors ``methods.py`` for the U-Net. Families: ``reference`` (full compute), ``encoder`` (Encoder Feature
Propagation through ``reuse_core.adapters.diffusers_transformer``: the leading ``encoder_fraction`` of the blocks
are the encoder), ``attention`` (Attention Map Reuse through ``reuse_core.adapters.diffusers_attention``, which drives
Flux's joint attention) and ``peer`` (diffusers' cache hooks: First Block Cache, Pyramid Attention Broadcast,
TaylorSeer, MagCache, FasterCache). Prior noise injection is off in the encoder rows: the paper defines it for the
variance-preserving DDIM latent, and a rectified-flow sampler has no such parametrisation
(``reuse_core.noise_injection``).
"""

from __future__ import annotations

import ast
import contextlib
import io
import logging

import torch

from reuse_core.adapters.diffusers_attention import DiffusersAttentionReuse
from reuse_core.adapters.diffusers_transformer import DiffusersFluxHost
from reuse_core.attention_engine import AttentionReuseConfig
from reuse_core.calibration import ChangeRecorder
from reuse_core.encoder_engine import EncoderPropagationConfig, EncoderPropagationEngine
from reuse_core.forecast import ForecastSpec
from reuse_core.key_steps import KeyStepSpec
from reuse_core.schedules import ReuseSchedule
from reuse_core.steps import StepMatch

from .builtin_dit import DEFAULT_GUIDANCE, DEFAULT_STEPS, BuiltinDiT, pack, position_ids, unpack
from .methods import (
    Method,
    attention_config,
    forecast_label,
    install_attention_reuse,
    recording_adapter,
    remove_attention_reuse,
)
from .sampling_dit import DiTPredictor, DiTSampleSpec, sample_dit

MODEL = "DiT"


class EncoderPropagationDiTPredictor(DiTPredictor):
    def __init__(self, model: BuiltinDiT, config: EncoderPropagationConfig):
        super().__init__(model)
        self.config = config
        self.host = DiffusersFluxHost(model.transformer, encoder_fraction=config.encoder_fraction)
        self.img_ids, self.txt_ids = position_ids()
        self.engine: EncoderPropagationEngine | None = None
        self.note = ""

    def begin(self, sigmas):
        plan = self.config.plan(len(sigmas) - 1)
        self.engine = EncoderPropagationEngine(
            plan, sigmas[:-1].tolist(), parallel=self.config.parallel_decoding, forecast=self.config.forecast
        )

    def predict(self, step, x, sigma, text, pooled):
        out = self.engine.predict(
            self.host,
            pack(x),
            sigma.expand(x.shape[0]),
            text,
            step=StepMatch(step, True),
            cache_key="cfg",
            pooled_projections=pooled,
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
        )
        return unpack(out)

    def end(self):
        s = self.engine.stats
        calls = s.encoder_passes_saved + s.full_passes
        self.note = (
            f"encoder ({self.host.encoder_blocks}/{len(self.host.blocks)} blocks) skipped at "
            f"{s.encoder_passes_saved}/{calls} calls, decoder batches {s.decoder_batches}"
        )
        self.engine.reset()


class AttentionReuseDiTPredictor(DiTPredictor):
    def __init__(self, model: BuiltinDiT, config: AttentionReuseConfig, schedule: ReuseSchedule):
        super().__init__(model)
        self.config, self.schedule = config, schedule
        self.adapter: DiffusersAttentionReuse | None = None
        self.note = ""
        self.cache_bytes = 0

    def begin(self, sigmas):
        self.adapter = install_attention_reuse(self.model.transformer, self.config, self.schedule, len(sigmas) - 1)

    def predict(self, step, x, sigma, text, pooled):
        self.adapter.set_step(step)
        return super().predict(step, x, sigma, text, pooled)

    def end(self):
        self.note, self.cache_bytes = remove_attention_reuse(self.adapter)


class RecordingDiTPredictor(DiTPredictor):
    """Full compute for calibration: records the state after the encoder blocks (both streams) and every attention
    call."""

    def __init__(self, model: BuiltinDiT):
        super().__init__(model)
        self.host = DiffusersFluxHost(model.transformer)  # the encoder rows' default split
        self.img_ids, self.txt_ids = position_ids()
        self.encoder, self.attention = ChangeRecorder(), ChangeRecorder()

    def begin(self, sigmas):
        self.adapter = recording_adapter(self.model.transformer, len(sigmas) - 1, self.attention)

    def predict(self, step, x, sigma, text, pooled):
        self.adapter.set_step(step)
        out, features = self.host.full_forward(
            pack(x), sigma.expand(x.shape[0]), text, capture=True,
            pooled_projections=pooled, img_ids=self.img_ids, txt_ids=self.txt_ids,
        )  # fmt: skip
        self.encoder.record_features(step, features)
        return unpack(out)

    def end(self):
        self.adapter.remove()


class _CountingProcessor:
    def __init__(self, inner, counter: _AttentionCounter, name: str):
        self.inner, self.counter, self.name = inner, counter, name

    def __call__(self, *args, **kwargs):
        self.counter.calls[self.name] += 1
        return self.inner(*args, **kwargs)


class _AttentionCounter:
    """Counts the attention computations of a transformer by wrapping every attention processor (output
    unchanged): a hook that skips a block or an attention layer never reaches its processor, so the count shows
    what a peer method left out."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.original = dict(transformer.attn_processors)
        self.calls = dict.fromkeys(self.original, 0)
        transformer.set_attn_processor({k: _CountingProcessor(v, self, k) for k, v in self.original.items()})

    def remove(self) -> None:
        self.transformer.set_attn_processor(self.original)


class FirstBlockCacheDiTPredictor(DiTPredictor):
    """diffusers' First Block Cache (``apply_first_block_cache`` through the model's ``enable_cache``): when the
    first block's residual changed little since the last full pass, the other blocks are replaced by their cached
    residual. One cache context for the whole CFG batch (it is one transformer call)."""

    def __init__(self, model: BuiltinDiT, threshold: float):
        super().__init__(model)
        self.threshold = threshold
        self.note = ""

    def begin(self, sigmas):
        from diffusers.hooks import FirstBlockCacheConfig

        self.steps = len(sigmas) - 1
        self.model.transformer.enable_cache(FirstBlockCacheConfig(threshold=self.threshold))
        self.counter = _AttentionCounter(self.model.transformer)

    def predict(self, step, x, sigma, text, pooled):
        with self.model.transformer.cache_context("cfg"):
            return super().predict(step, x, sigma, text, pooled)

    def end(self):
        self.model.transformer.disable_cache()
        self.counter.remove()
        tail = list(self.counter.calls.values())[-1]
        self.note = f"blocks 2-{len(self.counter.calls)} skipped at {self.steps - tail}/{self.steps} steps"


class PyramidAttentionBroadcastDiTPredictor(DiTPredictor):
    """diffusers' PAB hook on every Flux attention layer (joint attention counts as spatial attention)."""

    def __init__(self, model: BuiltinDiT, spatial_skip: int = 2, timestep_range=(100, 800)):
        super().__init__(model)
        self.spatial_skip, self.timestep_range = spatial_skip, timestep_range
        self.current_t = 1000.0
        self.note = ""

    def begin(self, sigmas):
        from diffusers.hooks import PyramidAttentionBroadcastConfig

        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.spatial_skip,
            spatial_attention_timestep_skip_range=self.timestep_range,
            current_timestep_callback=lambda: self.current_t,
        )
        self.model.transformer.enable_cache(config)
        self.counter = _AttentionCounter(self.model.transformer)
        self.layers = len(self.counter.calls)
        self.steps = len(sigmas) - 1

    def predict(self, step, x, sigma, text, pooled):
        self.current_t = float(sigma) * 1000  # PAB's timestep range is in the model's 0..1000 units
        with self.model.transformer.cache_context("cfg"):
            return super().predict(step, x, sigma, text, pooled)

    def end(self):
        self.model.transformer.disable_cache()
        self.counter.remove()
        computed = sum(self.counter.calls.values())
        self.note = f"attention calls skipped {self.steps * self.layers - computed}/{self.steps * self.layers}"


def _drop_cached_hook_registries(transformer: torch.nn.Module) -> None:
    """Make the next ``cache_context`` find the hooks that ``enable_cache`` just added (or removed).

    diffusers 0.39's ``HookRegistry`` lists the registries below the model once, at the first ``cache_context``,
    and keeps that list for good; a cache enabled later on the same model (as the bench does, one method after
    another) hooks other modules, whose state then never gets a context and fails with "No context is set"."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and hasattr(registry, "_child_registries_cache"):
        registry._child_registries_cache = None


class _DiffusersCacheDiTPredictor(DiTPredictor):
    """A diffusers cache hook (``transformer.enable_cache``) for one run, one cache context for the whole CFG batch
    (one transformer call per step), removed in ``end`` so that no state reaches the next run. Subclasses give the
    config and describe what was skipped; ``current_t`` is the step's timestep in the model's 0..1000 units (the
    hooks' timestep ranges and callbacks use the pipelines' ``current_timestep``, which is ``1000 * sigma``)."""

    def __init__(self, model: BuiltinDiT):
        super().__init__(model)
        self.note = ""
        self.current_t = 1000.0
        self.counter: _AttentionCounter | None = None

    def config(self, steps: int):
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def begin(self, sigmas):
        self.steps = len(sigmas) - 1
        self.model.transformer.enable_cache(self.config(self.steps))
        _drop_cached_hook_registries(self.model.transformer)
        self.counter = _AttentionCounter(self.model.transformer)

    def predict(self, step, x, sigma, text, pooled):
        self.current_t = float(sigma) * 1000
        with self.model.transformer.cache_context("cfg"):
            return super().predict(step, x, sigma, text, pooled)

    def end(self):
        if self.model.transformer.is_cache_enabled:
            self.model.transformer.disable_cache()
        _drop_cached_hook_registries(self.model.transformer)
        if self.counter is not None:
            self.counter.remove()
            self.note = self.describe()

    def attention_skipped(self) -> tuple[int, int]:
        total = self.steps * len(self.counter.calls)
        return total - sum(self.counter.calls.values()), total


class TaylorSeerDiTPredictor(_DiffusersCacheDiTPredictor):
    """diffusers' TaylorSeer cache: by default on every Flux attention layer (double and single stream; the MLPs
    run at every step). Each layer is computed at steps ``0 .. warmup - 1`` and then at ``warmup + 1``, ``warmup + 1
    + interval``, ... (diffusers' rule), and forecast at the others by a Taylor series of order ``order`` from the
    finite differences of its computed outputs."""

    def __init__(self, model: BuiltinDiT, interval: int, warmup: int, order: int = 1):
        super().__init__(model)
        self.interval, self.warmup, self.order = interval, warmup, order

    def config(self, steps):
        from diffusers.hooks import TaylorSeerCacheConfig

        # float32 Taylor factors, as diffusers' own Flux example sets (the dataclass's bfloat16 default is for
        # bfloat16 models; this one runs in float32, and so do our forecasting rows).
        return TaylorSeerCacheConfig(
            cache_interval=self.interval,
            disable_cache_before_step=self.warmup,
            max_order=self.order,
            taylor_factors_dtype=torch.float32,
        )

    def describe(self):
        skipped, total = self.attention_skipped()
        return f"attention calls forecast {skipped}/{total}"


class MagCacheDiTPredictor(_DiffusersCacheDiTPredictor):
    """diffusers' MagCache: the first block always runs; the others are replaced by the last computed residual
    (output of the last block minus input of the first, image stream) while the error accumulated from the
    per-step magnitude ratios ``mag_ratios`` stays under ``threshold`` (at most ``max_skip`` steps in a row, none in
    the first ``retention`` fraction of the run). The decision depends on the step index and the precomputed ratios
    only, not on the batch. ``calibrate=True`` skips nothing and records the ratios of the run (``ratios``)."""

    def __init__(
        self,
        model: BuiltinDiT,
        mag_ratios=None,
        threshold: float = 0.06,
        max_skip: int = 3,
        retention: float = 0.2,
        calibrate: bool = False,
    ):
        super().__init__(model)
        self.mag_ratios, self.threshold, self.max_skip, self.retention = mag_ratios, threshold, max_skip, retention
        self.calibrate = calibrate
        self.ratios: list[float] = []

    def config(self, steps):
        from diffusers.hooks import MagCacheConfig

        return MagCacheConfig(
            threshold=self.threshold,
            max_skip_steps=self.max_skip,
            retention_ratio=self.retention,
            num_inference_steps=steps,
            mag_ratios=None if self.calibrate else list(self.mag_ratios),
            calibrate=self.calibrate,
        )

    def predict(self, step, x, sigma, text, pooled):
        if not self.calibrate:
            return super().predict(step, x, sigma, text, pooled)
        # Calibration prints the ratios after the last step (its only output: the hook clears them right after).
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            out = super().predict(step, x, sigma, text, pooled)
        if step == self.steps - 1:
            self.ratios = _printed_mag_ratios(printed.getvalue())
        return out

    def describe(self):
        if self.calibrate:
            return f"calibration: nothing skipped, {len(self.ratios)} ratios recorded"
        tail = list(self.counter.calls.values())[-1]  # the last block's attention: the steps computed in full
        return f"blocks 2-{len(self.counter.calls)} skipped at {self.steps - tail}/{self.steps} steps"


def _printed_mag_ratios(text: str) -> list[float]:
    lines = text.splitlines()
    marker = next((i for i, line in enumerate(lines) if "[MagCache] Calibration Complete" in line), None)
    if marker is None or marker + 1 >= len(lines):
        raise RuntimeError(f"MagCache calibration printed no ratios (diffusers changed its output?): {text!r}")
    return [float(v) for v in ast.literal_eval(lines[marker + 1].strip())]


class FasterCacheDiTPredictor(_DiffusersCacheDiTPredictor):
    """diffusers' FasterCache in its guidance-distilled mode: every Flux attention layer is computed at every
    ``skip``-th step and, at the other steps below timestep ``below_t``, extrapolated from its last two outputs
    (``t + weight * (t - t_prev)``), for the whole CFG batch.

    Its other part (CFG-Cache: compute only the conditional half of the ``[uncond | cond]`` batch and approximate
    the unconditional output from the last measured difference, split into low and high frequencies) cannot run on
    this model: the frequency split takes a 2-D FFT of the model output as an image (``tensor_format``
    ``BCHW``/``BCFHW``/``BFCHW``), while Flux's transformer returns a token sequence ``[B, tokens, channels]``;
    its masks then broadcast to a 4-D tensor and concatenating it with the 3-D conditional half fails. diffusers
    itself runs FasterCache on Flux with ``is_guidance_distilled=True`` (its Flux pipeline tests), which is this."""

    def __init__(self, model: BuiltinDiT, skip: int = 2, below_t: float = 681, weight: float = 0.5):
        super().__init__(model)
        self.skip, self.below_t, self.weight = skip, below_t, weight

    def config(self, steps):
        from diffusers.hooks import FasterCacheConfig

        return FasterCacheConfig(
            spatial_attention_block_skip_range=self.skip,
            spatial_attention_timestep_skip_range=(-1, self.below_t),
            attention_weight_callback=lambda _module: self.weight,
            current_timestep_callback=lambda: self.current_t,
            is_guidance_distilled=True,
        )

    def begin(self, sigmas):
        # apply_faster_cache warns at every call that the feature is experimental: once per sampling run is noise.
        log = logging.getLogger("diffusers.hooks.faster_cache")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            super().begin(sigmas)
        finally:
            log.setLevel(level)

    def describe(self):
        skipped, total = self.attention_skipped()
        return f"attention calls extrapolated {skipped}/{total}"


def _label(name: str) -> str:
    return f"{MODEL}: {name}"


def reference(steps: int) -> Method:
    return Method(_label(f"Euler {steps} (full compute)"), "reference", steps, DiTPredictor, {"steps": steps})


def encoder_method(name: str, steps: int, keys: KeyStepSpec, parallel: bool = True, forecast: int = 0) -> Method:
    config = EncoderPropagationConfig(key_steps=keys, parallel_decoding=parallel, forecast=ForecastSpec(forecast))
    return Method(
        _label(f"{name}, parallel {'on' if parallel else 'off'}{forecast_label(forecast)}"),
        "encoder",
        steps,
        lambda m: EncoderPropagationDiTPredictor(m, config),
        {
            "key_steps": list(keys.key_steps(steps)),
            "parallel": parallel,
            "injection": False,
            "encoder_fraction": config.encoder_fraction,
            "forecast": config.forecast.name,
        },
    )


def attention_method(name: str, steps: int, schedule: ReuseSchedule, mode: str, forecast: int = 0) -> Method:
    config = attention_config(mode, forecast)
    return Method(
        _label(f"{name}, {mode}{forecast_label(forecast)}"),
        "attention",
        steps,
        lambda m: AttentionReuseDiTPredictor(m, config, schedule),
        {"schedule": str(schedule), "mode": mode, "forecast": ForecastSpec(forecast).name},
    )


def first_block_cache(steps: int, threshold: float) -> Method:
    return Method(
        _label(f"First Block Cache (diffusers hook, threshold {threshold})"),
        "peer",
        steps,
        lambda m: FirstBlockCacheDiTPredictor(m, threshold),
        {"threshold": threshold},
        batch_dependent=True,
    )


# MagCache's per-step magnitude ratios for the built-in DiT at its 24 steps, from
# ``calibrate_mag_ratios(load_builtin_dit())``: diffusers' calibration mode (``MagCacheConfig(calibrate=True)``) on
# the PHAST search's seeds and labels (not the bench's), guidance 2, the CFG batch in one call (so each ratio is the
# mean over both halves). On the bench's own seeds 0-9 the ratios differ by under 0.002. MagCache interpolates them
# to other step counts (nearest step). tests/test_dit_peers.py checks that a new calibration still gives them.
DIT_MAG_RATIOS = (
    1.0, 1.26759, 0.99627, 0.94839, 0.98546, 0.93724, 0.96152, 0.94726, 0.96952, 0.93347, 0.97098, 0.96352,
    0.94385, 0.95281, 0.95395, 0.96442, 0.9628, 0.95757, 0.96136, 0.967, 0.96647, 0.95222, 0.96839, 1.00007,
)  # fmt: skip


def calibrate_mag_ratios(model: BuiltinDiT, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> list:
    """One full-compute run of diffusers' MagCache calibration on the search seeds: the ratios for ``mag_ratios``."""
    from .phast_search import SEARCH_LABELS, SEARCH_SEEDS

    predictor = MagCacheDiTPredictor(model, calibrate=True)
    sample_dit(model, DiTSampleSpec(SEARCH_LABELS, SEARCH_SEEDS, steps, guidance), predictor)
    return predictor.ratios


def taylorseer(steps: int, interval: int, warmup: int, what: str) -> Method:
    return Method(
        _label(
            f"TaylorSeer (diffusers hook, {what}: cache_interval {interval}, disable_cache_before_step {warmup}, "
            "max_order 1)"
        ),
        "peer",
        steps,
        lambda m: TaylorSeerDiTPredictor(m, interval, warmup, order=1),
        {"cache_interval": interval, "disable_cache_before_step": warmup, "max_order": 1, "factors": "float32"},
    )


def mag_cache(steps: int, threshold: float = 0.06, max_skip: int = 3, retention: float = 0.2) -> Method:
    return Method(
        _label(
            f"MagCache (diffusers hook, documented default: threshold {threshold}, max_skip_steps {max_skip}, "
            f"retention_ratio {retention}; mag_ratios calibrated on seeds 1000-1003)"
        ),
        "peer",
        steps,
        lambda m: MagCacheDiTPredictor(m, DIT_MAG_RATIOS, threshold, max_skip, retention),
        {"threshold": threshold, "max_skip_steps": max_skip, "retention_ratio": retention, "mag_ratios": "calibrated"},
    )


def faster_cache(steps: int, below_t: float, what: str, skip: int = 2, weight: float = 0.5) -> Method:
    return Method(
        _label(
            f"FasterCache (diffusers hook, {what}: attention every {skip} steps below t={below_t:g}, weight {weight}; "
            "guidance-distilled mode, no CFG-Cache)"
        ),
        "peer",
        steps,
        lambda m: FasterCacheDiTPredictor(m, skip, below_t, weight),
        {
            "spatial_attention_block_skip_range": skip,
            "spatial_attention_timestep_skip_range": [-1, below_t],
            "attention_weight": weight,
            "is_guidance_distilled": True,
        },
    )


def peer_methods(steps: int, quick: bool = False) -> list[Method]:
    # On this model the first block's residual changes by 0.08-0.2 (relative) from step to step of a 24-step run
    # (measured on seeds 100-103): 0.1 skips about 4 of 24 steps, 0.2 (diffusers' documented example) about half.
    rows = [first_block_cache(steps, 0.1)]
    if not quick:
        rows.append(first_block_cache(steps, 0.2))
        rows.append(
            Method(
                _label("Pyramid Attention Broadcast (diffusers hook)"),
                "peer",
                steps,
                lambda m: PyramidAttentionBroadcastDiTPredictor(m),
                {"spatial_skip": 2, "timestep_range": [100, 800]},
            )
        )
    # TaylorSeer's documented default (TaylorSeerCacheConfig()); MagCache's documented default with this model's
    # own ratios (DIT_MAG_RATIOS).
    rows.append(taylorseer(steps, 5, 3, "documented default"))
    rows.append(mag_cache(steps))
    if not quick:
        # The steps of our uniform k=2 rows with a linear forecast: computed at the even steps, forecast (order 1)
        # at the odd ones; TaylorSeer forecasts the attention layers only (the MLPs run at every step).
        rows.append(taylorseer(steps, 2, 1, "the key steps of uniform k=2"))
        # FasterCache's documented defaults (skip range 2 below t=681, weight 0.5), then the setting diffusers
        # tests it with on Flux (below t=901); both in guidance-distilled mode, the only one that runs on Flux's
        # transformer (FasterCacheDiTPredictor says why).
        rows.append(faster_cache(steps, 681, "documented default"))
        rows.append(faster_cache(steps, 901, "diffusers' Flux test setting"))
    return rows
