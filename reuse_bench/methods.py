"""The rows of the bench: every method as a ``StepPredictor`` factory on the built-in model.

Each ``Method`` builds a fresh predictor per sampling run (so no state leaks between runs) and, after the
run, reports what it skipped (``work_note``). Families: ``reference`` (full compute), ``attention``
(Attention Map Reuse through ``reuse_core.adapters.diffusers_attention``), ``encoder`` (Encoder Feature
Propagation through ``reuse_core.adapters.diffusers_encoder``), ``both``, and ``peer`` (diffusers' Pyramid
Attention Broadcast hook, the DeepCache library). ``RecordingPredictor`` records a full-compute run for calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from reuse_core.adapters.diffusers_attention import DiffusersAttentionReuse
from reuse_core.adapters.diffusers_encoder import DiffusersUNetHost
from reuse_core.attention_engine import AttentionReuseConfig
from reuse_core.calibration import (
    ATTENTION_MAP,
    ATTENTION_OUTPUT,
    ChangeRecorder,
    optimal_compute_steps,
    sigma_step_weights,
)
from reuse_core.encoder_engine import EncoderPropagationConfig, EncoderPropagationEngine
from reuse_core.forecast import ForecastSpec
from reuse_core.key_steps import KeyStepSpec
from reuse_core.noise_injection import PAPER_ALPHA, PAPER_TAU, PriorNoiseInjection
from reuse_core.schedules import ReuseSchedule, hurry
from reuse_core.steps import StepMatch

from .builtin_model import BuiltinModel
from .sampling import StepPredictor


def install_attention_reuse(
    module, config: AttentionReuseConfig, schedule: ReuseSchedule, steps: int
) -> DiffusersAttentionReuse:
    """Attention reuse on ``module`` (a U-Net or a transformer) for one sampling run of ``steps`` steps."""
    if steps != schedule.steps:
        raise ValueError(f"schedule has {schedule.steps} steps, run has {steps}")
    return DiffusersAttentionReuse(module, config, schedule).install()


def remove_attention_reuse(adapter: DiffusersAttentionReuse) -> tuple[str, int]:
    """Remove ``adapter`` at the end of its run: (the table's note, the cache's peak bytes)."""
    stats = adapter.run.stats
    total = stats.reused + stats.stored + stats.computed + stats.fresh + stats.untargeted + stats.fallbacks
    note = f"attention calls reused {stats.reused}/{total}"
    if stats.fallbacks or stats.refused:
        note += f" (fallbacks {stats.fallbacks}, refused {stats.refused})"
    peak = adapter.run.cache.peak_bytes
    adapter.remove()
    return note, peak


class AttentionReusePredictor(StepPredictor):
    def __init__(self, model: BuiltinModel, config: AttentionReuseConfig, schedule: ReuseSchedule):
        super().__init__(model)
        self.config, self.schedule = config, schedule
        self.adapter: DiffusersAttentionReuse | None = None
        self.note = ""
        self.cache_bytes = 0

    def begin(self, timesteps):
        self.adapter = install_attention_reuse(self.model.unet, self.config, self.schedule, len(timesteps))

    def predict(self, step, x, t, context):
        self.adapter.set_step(step)
        return super().predict(step, x, t, context)

    def end(self):
        self.note, self.cache_bytes = remove_attention_reuse(self.adapter)


class EncoderPropagationPredictor(StepPredictor):
    def __init__(self, model: BuiltinModel, config: EncoderPropagationConfig):
        super().__init__(model)
        self.config = config
        self.injection = config.injection if config.injection.enabled else None
        self.host = DiffusersUNetHost(model.unet)
        self.engine: EncoderPropagationEngine | None = None
        self.note = ""

    def begin(self, timesteps):
        plan = self.config.plan(len(timesteps))
        self.engine = EncoderPropagationEngine(
            plan, timesteps.tolist(), parallel=self.config.parallel_decoding, forecast=self.config.forecast
        )

    def predict(self, step, x, t, context):
        timesteps = t.expand(x.shape[0])
        return self.engine.predict(self.host, x, timesteps, context, step=StepMatch(step, True), cache_key="cfg")

    def end(self):
        s = self.engine.stats
        self.note = (
            f"encoder passes saved {s.encoder_passes_saved}/{s.encoder_passes_saved + s.full_passes}, "
            f"decoder batches {s.decoder_batches}"
        )
        self.engine.reset()


class CombinedPredictor(EncoderPropagationPredictor):
    """Both methods: the encoder engine drives the U-Net, the attention processors reuse inside it."""

    def __init__(
        self, model, encoder: EncoderPropagationConfig, attention: AttentionReuseConfig, schedule: ReuseSchedule
    ):
        super().__init__(model, encoder)
        self.attention = AttentionReusePredictor(model, attention, schedule)

    def begin(self, timesteps):
        super().begin(timesteps)
        self.attention.begin(timesteps)

    def predict(self, step, x, t, context):
        self.attention.adapter.set_step(step)
        return super().predict(step, x, t, context)

    def end(self):
        super().end()
        self.attention.end()
        self.note = f"{self.note}; {self.attention.note}"


class _RecordingRun:
    """Stands in for ``AttentionReuseRun`` inside the diffusers adapter: computes, and records every call."""

    def __init__(self, recorder: ChangeRecorder):
        self.recorder = recorder

    def attention(self, fused, q, k, v, *, heads, step, layer_key, **_):
        out = fused()
        if step is not None:
            self.recorder.record_attention(step, (layer_key,), q, k, out)
        return out

    def reset(self) -> None:
        pass


def recording_adapter(module: torch.nn.Module, steps: int, recorder: ChangeRecorder) -> DiffusersAttentionReuse:
    adapter = DiffusersAttentionReuse(module, attention_config("output"), hurry(steps, 0))
    adapter.run = _RecordingRun(recorder)
    return adapter.install()


class RecordingPredictor(StepPredictor):
    """Full compute for calibration: records the encoder features (skips + middle) and every attention call."""

    def __init__(self, model: BuiltinModel):
        super().__init__(model)
        self.host = DiffusersUNetHost(model.unet)
        self.encoder, self.attention = ChangeRecorder(), ChangeRecorder()

    def begin(self, timesteps):
        self.adapter = recording_adapter(self.model.unet, len(timesteps), self.attention)

    def predict(self, step, x, t, context):
        self.adapter.set_step(step)
        out, features = self.host.full_forward(x, t.expand(x.shape[0]), context, capture=True)
        self.encoder.record_features(step, features)
        return out

    def end(self):
        self.adapter.remove()


def calibrated_key_steps(drift: dict, count: int) -> tuple[int, ...]:
    """The ``count`` key steps that calibration picks from ``drift_matrices``."""
    return optimal_compute_steps(drift["encoder"], count, weights=drift["weights"]).steps


def calibrated_schedule(drift: dict, reuse: int, mode: str = ATTENTION_OUTPUT) -> ReuseSchedule:
    """The attention schedule with ``reuse`` reused steps that calibration picks from ``drift_matrices``."""
    steps = len(drift["weights"])
    return optimal_compute_steps(drift[mode], steps - reuse, weights=drift["weights"]).schedule(steps)


def drift_matrices(recorder, sigmas: list[float]) -> dict[str, list[list[float]]]:
    """What calibration needs from a recording predictor's finished run of ``len(sigmas) - 1`` steps: the sigma-step
    weights and the drift matrices of the encoder features and of the attention maps and outputs."""
    steps = len(sigmas) - 1
    return {
        "weights": sigma_step_weights(sigmas),
        "encoder": recorder.encoder.drift(steps),
        **{
            kind: recorder.attention.drift(steps, recorder.attention.names(kind))
            for kind in (ATTENTION_MAP, ATTENTION_OUTPUT)
        },
    }


class PyramidAttentionBroadcastPredictor(StepPredictor):
    """diffusers' PAB hook on every ``Attention`` module of the U-Net (applied per run, removed after)."""

    HOOK = "pyramid_attention_broadcast"

    def __init__(self, model, spatial_skip: int = 2, cross_skip: int | None = 6, timestep_range=(100, 800)):
        super().__init__(model)
        self.spatial_skip, self.cross_skip, self.timestep_range = spatial_skip, cross_skip, timestep_range
        self.current_t = 1000
        self.calls = self.computed = 0
        self.note = ""

    def begin(self, timesteps):
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.spatial_skip,
            spatial_attention_timestep_skip_range=self.timestep_range,
            cross_attention_block_skip_range=self.cross_skip,
            cross_attention_timestep_skip_range=self.timestep_range,
            current_timestep_callback=lambda: self.current_t,
        )
        apply_pyramid_attention_broadcast(self.model.unet, config)
        self._processors = dict(self.model.unet.attn_processors)
        self.hooked = sum(
            1
            for m in self.model.unet.modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(self.HOOK)
        )
        if self.hooked == 0:
            raise RuntimeError("Pyramid Attention Broadcast matched no attention module of this U-Net")
        counter = self

        class Counting:  # counts attention computations that PAB did not skip; output unchanged
            def __init__(self, inner):
                self.inner = inner

            def __call__(self, *args, **kwargs):
                counter.computed += 1
                return self.inner(*args, **kwargs)

        self.model.unet.set_attn_processor({k: Counting(v) for k, v in self._processors.items()})

    def predict(self, step, x, t, context):
        self.current_t = int(t)
        self.calls += self.hooked
        return super().predict(step, x, t, context)

    def end(self):
        from diffusers.hooks import HookRegistry

        self.model.unet.set_attn_processor(self._processors)
        HookRegistry.check_if_exists_or_initialize(self.model.unet).remove_hook(self.HOOK, recurse=True)
        self.note = f"attention calls skipped {self.calls - self.computed}/{self.calls}"


class DeepCachePredictor(StepPredictor):
    """The DeepCache library's ``DeepCacheSDHelper`` on the same U-Net (it needs only ``pipe.unet`` and
    ``pipe.scheduler.timesteps``, so a two-attribute stand-in for the pipeline is enough)."""

    def __init__(self, model, cache_interval: int = 3, cache_branch_id: int = 0):
        super().__init__(model)
        self.cache_interval, self.cache_branch_id = cache_interval, cache_branch_id
        self.note = ""

    def begin(self, timesteps):
        from DeepCache import DeepCacheSDHelper

        pipe = SimpleNamespace(unet=self.model.unet, scheduler=SimpleNamespace(timesteps=timesteps))
        self.helper = DeepCacheSDHelper(pipe=pipe)
        self.helper.set_params(cache_interval=self.cache_interval, cache_branch_id=self.cache_branch_id)
        self.helper.enable()
        self.steps = len(timesteps)

    def end(self):
        self.helper.disable()
        full = len(range(0, self.steps, self.cache_interval))
        self.note = f"deep branch skipped at {self.steps - full}/{self.steps} steps"


@dataclass
class Method:
    """One row: ``make(model)`` returns a fresh predictor for one run."""

    name: str
    family: str
    steps: int
    make: Callable[[BuiltinModel], StepPredictor]
    settings: dict = field(default_factory=dict)
    # What it skips is decided from the whole batch (e.g. First Block Cache's mean residual change), so one image
    # sampled alone may legitimately differ from the same image sampled with others.
    batch_dependent: bool = False


def attention_config(mode: str, forecast: int = 0) -> AttentionReuseConfig:
    """The attention-reuse settings of every bench row and of the PHAST search (so the two never drift apart)."""
    return AttentionReuseConfig(mode=mode, targets="both", memory_budget_mb=4096, forecast=ForecastSpec(forecast))


def forecast_label(order: int) -> str:
    """A row name's suffix: nothing for reuse (the rows the bench had before forecasting), else the forecast."""
    return f", forecast {ForecastSpec(order).name}" if order else ""


def reference(steps: int) -> Method:
    return Method(f"DDIM {steps} (full compute)", "reference", steps, StepPredictor, {"steps": steps})


def attention_method(name: str, steps: int, schedule: ReuseSchedule, mode: str, forecast: int = 0) -> Method:
    config = attention_config(mode, forecast)
    return Method(
        f"{name}, {mode}{forecast_label(forecast)}",
        "attention",
        steps,
        lambda m: AttentionReusePredictor(m, config, schedule),
        {"schedule": str(schedule), "mode": mode, "forecast": ForecastSpec(forecast).name},
    )


def encoder_method(
    name: str, steps: int, keys: KeyStepSpec, parallel: bool, injection: bool = True, forecast: int = 0
) -> Method:
    config = EncoderPropagationConfig(
        key_steps=keys,
        parallel_decoding=parallel,
        injection=PriorNoiseInjection(PAPER_ALPHA if injection else 0.0, PAPER_TAU),
        forecast=ForecastSpec(forecast),
    )
    label = f"{name}, parallel {'on' if parallel else 'off'}" + ("" if injection else ", no injection")
    label += forecast_label(forecast)
    return Method(
        label,
        "encoder",
        steps,
        lambda m: EncoderPropagationPredictor(m, config),
        {
            "key_steps": list(keys.key_steps(steps)),
            "parallel": parallel,
            "injection": injection,
            "forecast": config.forecast.name,
        },
    )


def combined_method(steps: int, keys: KeyStepSpec, schedule: ReuseSchedule, mode: str) -> Method:
    encoder = EncoderPropagationConfig(
        key_steps=keys, parallel_decoding=False, injection=PriorNoiseInjection(PAPER_ALPHA, PAPER_TAU)
    )
    attention = attention_config(mode)
    return Method(
        f"Both: encoder {keys.preset} + PHAST searched {mode}",
        "both",
        steps,
        lambda m: CombinedPredictor(m, encoder, attention, schedule),
        {"key_steps": list(keys.key_steps(steps)), "schedule": str(schedule), "mode": mode},
    )


def peer_methods(steps: int) -> list[Method]:
    return [
        Method(
            "Pyramid Attention Broadcast (diffusers hook)",
            "peer",
            steps,
            lambda m: PyramidAttentionBroadcastPredictor(m),
            {"spatial_skip": 2, "cross_skip": 6, "timestep_range": [100, 800]},
        ),
        Method(
            "DeepCache (interval 3, branch 0)",
            "peer",
            steps,
            lambda m: DeepCachePredictor(m),
            {"cache_interval": 3, "cache_branch_id": 0},
        ),
    ]
