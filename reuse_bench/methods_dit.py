"""The DiT rows of the bench: every method as a ``DiTPredictor`` factory on the built-in DiT.

Mirrors ``methods.py`` for the U-Net. Families: ``reference`` (full compute), ``encoder`` (Encoder Feature
Propagation through ``reuse_core.adapters.diffusers_transformer``: the leading ``encoder_fraction`` of the blocks
are the encoder), ``attention`` (Attention Map Reuse through ``reuse_core.adapters.diffusers_attention``, which drives
Flux's joint attention) and ``peer`` (diffusers' First Block Cache and Pyramid Attention Broadcast hooks). Prior
noise injection is off in the encoder rows: the paper defines it for the variance-preserving DDIM latent, and a
rectified-flow sampler has no such parametrisation (``reuse_core.noise_injection``).
"""

from __future__ import annotations

import torch

from reuse_core.adapters.diffusers_attention import DiffusersAttentionReuse
from reuse_core.adapters.diffusers_transformer import DiffusersFluxHost
from reuse_core.attention_engine import AttentionReuseConfig
from reuse_core.calibration import ChangeRecorder
from reuse_core.encoder_engine import EncoderPropagationConfig, EncoderPropagationEngine
from reuse_core.key_steps import KeyStepSpec
from reuse_core.schedules import ReuseSchedule
from reuse_core.steps import StepMatch

from .builtin_dit import BuiltinDiT, pack, position_ids, unpack
from .methods import Method, attention_config, install_attention_reuse, recording_adapter, remove_attention_reuse
from .sampling_dit import DiTPredictor

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
        self.engine = EncoderPropagationEngine(plan, sigmas[:-1].tolist(), parallel=self.config.parallel_decoding)

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


def _label(name: str) -> str:
    return f"{MODEL}: {name}"


def reference(steps: int) -> Method:
    return Method(_label(f"Euler {steps} (full compute)"), "reference", steps, DiTPredictor, {"steps": steps})


def encoder_method(name: str, steps: int, keys: KeyStepSpec, parallel: bool = True) -> Method:
    config = EncoderPropagationConfig(key_steps=keys, parallel_decoding=parallel)
    return Method(
        _label(f"{name}, parallel {'on' if parallel else 'off'}"),
        "encoder",
        steps,
        lambda m: EncoderPropagationDiTPredictor(m, config),
        {
            "key_steps": list(keys.key_steps(steps)),
            "parallel": parallel,
            "injection": False,
            "encoder_fraction": config.encoder_fraction,
        },
    )


def attention_method(name: str, steps: int, schedule: ReuseSchedule, mode: str) -> Method:
    config = attention_config(mode)
    return Method(
        _label(f"{name}, {mode}"),
        "attention",
        steps,
        lambda m: AttentionReuseDiTPredictor(m, config, schedule),
        {"schedule": str(schedule), "mode": mode},
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
    return rows
