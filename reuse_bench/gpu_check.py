"""GPU check: both nodes on full-width random-weight SD1.5, SDXL, Flux and Wan models in real ComfyUI, on one GPU.

One command, sized for one H200 within a few minutes; its output is one JSON and one Markdown table. The models are
ComfyUI's own classes (``comfy.supported_models`` config + ``comfy.model_base`` model + ``ModelPatcher``), built
on the GPU with random weights (the cost of a step does not depend on the weight values; nothing is downloaded),
sampled with ``comfy.sample.sample`` and PyTorch SDPA attention, ComfyUI imported in its GPU mode:

  * ``sd15``: the SD1.5 U-Net at full size (``sd15_comfy.SD15_UNET_CONFIG``), fp16, 512x512, CFG 7 (batch 2);
  * ``sdxl``: the SDXL base U-Net at full size (ComfyUI's detected config), fp16, 1024x1024, CFG 7;
  * ``flux``: a Flux.1-dev-width transformer (``comfy_dit_timing.flux_unet``: hidden 3072, 24 heads, guidance
    embedding, 256 T5 tokens) at reduced depth (``--flux-depth``, default 10 double + 19 single of 19 + 38), bf16,
    1024x1024, cfg 1 (batch 1);
  * ``wan``: a Wan 2.1 14B-width text-to-video transformer (``WAN21_T2V`` + ``model_base.WAN21``: dim 5120, 40
    heads, FFN 13824, 512 umT5 tokens) at reduced depth (``--wan-layers``, default 8 of 40), bf16, 480x832 with
    17 frames (5 latent frames, 7800 tokens), CFG 5.

Per model, ``--steps`` (20) euler steps of nine variants, interleaved over ``--rounds`` (3) rounds after one
warm-up run; every time is the median over the rounds, with ``torch.cuda.synchronize()`` around it:

  * ``baseline``: the unpatched model;
  * ``EFP defaults``: Encoder Feature Propagation at its node defaults (``paper`` key steps, parallel decoding);
  * ``EFP uniform k=4``: ``key_steps = uniform``, ``uniform_k`` 4, parallel decoding, and once more sequentially
    (``EFP uniform k=4 seq``, the run the step kinds below come from);
  * ``AMR defaults``: Attention Map Reuse at its node defaults (``phast``, 10 reused steps, ``map`` mode, 2048 MB);
  * ``AMR output``: ``phast`` 10 in ``output`` mode with ``memory_budget_mb`` ``OUTPUT_BUDGET_MB``;
  * ``AMR output + linear`` and ``EFP uniform k=4 + linear``: those two with ``forecast = linear`` (its cost);
  * ``AMR output + EFP defaults``: both nodes chained (attention reuse first), as in the README's diagram.

Results: ``speedup`` = baseline wall / variant wall; ``peak_gib`` = ``torch.cuda.max_memory_allocated`` over the
variant's runs (reset before each run), ``weights_gib`` = memory allocated by building the model; time per step
kind (one model call per step, CFG cond and uncond batched, timed by an ``APPLY_MODEL`` wrapper): the full step
(baseline), the key step and the decoder-only step (EFP uniform k=4 sequential: ``encoder_share`` = 1 - decoder-only
/ full), the compute step and the reuse step of attention reuse in output mode; what each run reused, parsed from the
nodes' own summary lines (kept in the JSON) and ``latent_rel_diff``, the final latent's relative L2 distance from the
baseline's (random weights: a sanity number, not image quality).

Time budget: a model starts only while less than ``--budget-s`` (360) seconds have passed since the start; after the
warm-up run its rounds are cut so that its projected end (``ROUND_COST`` warm-up runs a round) stays under
``--limit-s`` (450; none left: warm-up only), and rounds stop early once the next would pass it. What is skipped or
cut is said in the table and the JSON (``status``, ``rounds``).
A variant that raises is recorded with its error and the check goes on. The JSON is rewritten after every model.

Run on the device machine (ComfyUI 0.33.0 and the missing wheels carried in ``.device/``, made by
``scripts/gpu_check_prepare.sh``)::

    bash scripts/gpu_check.sh                  # -> $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/gpu_check.log

Anywhere else::

    python -m reuse_bench.gpu_check --out out/gpu_check [--comfyui PATH] [--models sd15 flux] [--rounds 2]
    python -m reuse_bench.gpu_check --tiny --out out/gpu_check_tiny    # CPU, tiny widths: checks the code paths

``--tiny`` builds the same four families at tiny widths (fp32 unless ``--dtype``) and runs on the CPU, one round; it
is what ``tests/test_gpu_check.py`` runs. API: ``run(comfy_path=None, tiny=False, **settings) -> dict`` (the JSON).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import comfy_dit_timing, comfyui_env, sd15_comfy

MODELS = ("sd15", "sdxl", "flux", "wan")
STEPS = 20
ROUNDS = 3
BUDGET_S = 360.0
LIMIT_S = 450.0
FLUX_DEPTH = (10, 19)  # double, single blocks (Flux.1: 19 + 38)
WAN_LAYERS = 8  # Wan 2.1 14B: 40
WAN_FRAMES = 17  # pixel frames: (17 - 1) / 4 + 1 = 5 latent frames
OUTPUT_BUDGET_MB = 65536  # AMR output mode: room for every layer's kept outputs on a 141 GB card
# Cost of one round of the variants, in baseline runs (the reuse runs are cheaper, map mode can be dearer): used
# to size the rounds from the warm-up run before the first round has been measured.
ROUND_COST = 7.0
TIMER_KEY = "reuse_bench.gpu_check.step_timer"
SUMMARY_PREFIXES = ("Attention Map Reuse:", "Encoder Feature Propagation:")


# --- models --------------------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """One model to check: the patcher, its conditioning and empty latent, and what to report about it."""

    key: str
    label: str
    patcher: object
    positive: list
    negative: list
    latent: torch.Tensor
    cfg: float
    scheduler: str
    info: dict = field(default_factory=dict)  # size, tokens (the longest self-attention sequence), depth


def init_weights(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Random weights on the model's own device: matrices and kernels normal(0, std), biases 0, other vectors
    (norm weights and scales) 1. ComfyUI leaves them ``torch.empty``."""
    gen = None
    with torch.no_grad():
        for name, param in model.named_parameters():
            if gen is None:
                gen = torch.Generator(device=param.device).manual_seed(seed)
            if param.ndim >= 2:
                param.normal_(0.0, std, generator=gen)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def _patcher(config_cls, model_cls, unet: dict, device, dtype, seed: int = 0, **model_kwargs):
    import comfy.model_patcher

    config = config_cls(dict(unet))
    config.unet_config.update(unet)  # over the config class's unet_extra_config
    config.set_inference_dtype(dtype, None)
    model = model_cls(config, device=device, **model_kwargs)
    init_weights(model, seed)
    model.eval()
    # Built where it runs: ComfyUI's loader finds it in place, and unloading it between models moves nothing.
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def _text(seed: int, tokens: int, dim: int, **fields) -> tuple[list, list]:
    """(positive, negative) CONDITIONING: random ``[1, tokens, dim]`` embeddings and ``fields`` (callables per cond)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for scale in (1.0, 0.1):
        extra = {k: (v(gen) if callable(v) else v) for k, v in fields.items()}
        out.append([[torch.randn(1, tokens, dim, generator=gen) * scale, extra]])
    return out[0], out[1]


def build_sd15(device, dtype, tiny: bool) -> Subject:
    import comfy.model_base
    import comfy.supported_models

    unet = dict(sd15_comfy.SD15_UNET_CONFIG)
    size, context = 512, 768
    if tiny:
        size, context = 64, 64
        unet.update(
            model_channels=32,
            num_res_blocks=[1, 1],
            channel_mult=[1, 2],
            transformer_depth=[1, 1],
            transformer_depth_output=[1, 1, 1, 1],
            context_dim=context,
            num_heads=2,
        )
    patcher = _patcher(comfy.supported_models.SD15, comfy.model_base.BaseModel, unet, device, dtype)
    positive, negative = _text(1, 77, context)
    latent = torch.zeros(1, 4, size // 8, size // 8)
    info = dict(size=f"{size}x{size}", tokens=(size // 8) ** 2, depth="full U-Net")
    return Subject("sd15", "SD1.5 U-Net", patcher, positive, negative, latent, 7.0, "normal", info)


SDXL_UNET_CONFIG = dict(  # comfy.model_detection's SDXL config (without its dtype)
    use_checkpoint=False,
    image_size=32,
    out_channels=4,
    use_spatial_transformer=True,
    legacy=False,
    num_classes="sequential",
    adm_in_channels=2816,
    in_channels=4,
    model_channels=320,
    num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    channel_mult=[1, 2, 4],
    transformer_depth_middle=10,
    use_linear_in_transformer=True,
    context_dim=2048,
    num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    use_temporal_attention=False,
    use_temporal_resblock=False,
)


def build_sdxl(device, dtype, tiny: bool) -> Subject:
    import comfy.model_base
    import comfy.supported_models

    unet = dict(SDXL_UNET_CONFIG)
    size, context = 1024, 2048
    if tiny:
        size, context = 64, 64
        unet.update(
            model_channels=32,
            num_res_blocks=[1, 1],
            channel_mult=[1, 2],
            transformer_depth=[0, 0, 1, 1],
            transformer_depth_middle=1,
            transformer_depth_output=[0, 0, 1, 1],
            context_dim=context,
            num_head_channels=16,
        )
    patcher = _patcher(comfy.supported_models.SDXL, comfy.model_base.SDXL, unet, device, dtype)
    sizes = dict(width=size, height=size, crop_w=0, crop_h=0, target_width=size, target_height=size)
    positive, negative = _text(2, 77, context, pooled_output=lambda gen: torch.randn(1, 1280, generator=gen), **sizes)
    latent = torch.zeros(1, 4, size // 8, size // 8)
    info = dict(size=f"{size}x{size}", tokens=(size // 16) ** 2, depth="full U-Net")  # no attention at 1/8
    return Subject("sdxl", "SDXL U-Net", patcher, positive, negative, latent, 7.0, "normal", info)


def build_flux(device, dtype, tiny: bool, depth: tuple[int, int] = FLUX_DEPTH) -> Subject:
    import comfy.model_base
    import comfy.supported_models
    from comfy.ldm.flux.model import FluxParams

    hidden, heads, size, tokens = (64, 2, 64, 16) if tiny else (3072, 24, 1024, 256)
    double, single = (1, 2) if tiny else depth
    unet = comfy_dit_timing.flux_unet(hidden, heads)
    unet.update(depth=double, depth_single_blocks=single)
    names = set(FluxParams.__dataclass_fields__) | {"image_model"}
    unet = {k: v for k, v in unet.items() if k in names}
    patcher = _patcher(comfy.supported_models.Flux, comfy.model_base.Flux, unet, device, dtype)
    pooled = lambda gen: torch.randn(1, 768, generator=gen)  # noqa: E731
    positive, negative = _text(3, tokens, 4096, pooled_output=pooled, guidance=3.5)
    latent = torch.zeros(1, 16, size // 8, size // 8)
    info = dict(
        size=f"{size}x{size}",
        tokens=(size // 16) ** 2 + tokens,
        depth=f"{double} double + {single} single blocks (Flux.1: 19 + 38)",
    )
    return Subject("flux", f"Flux-width transformer (hidden {hidden})", patcher, positive, negative, latent, 1.0,
                   "simple", info)  # fmt: skip


def build_wan(device, dtype, tiny: bool, layers: int = WAN_LAYERS, frames: int = WAN_FRAMES) -> Subject:
    import comfy.model_base
    import comfy.supported_models

    dim, ffn, heads, tokens = (64, 128, 2, 16) if tiny else (5120, 13824, 40, 512)
    height, width = (64, 64) if tiny else (480, 832)
    layers, frames = (2, 5) if tiny else (layers, frames)
    unet = dict(
        image_model="wan2.1",
        model_type="t2v",
        patch_size=(1, 2, 2),
        text_len=512,
        in_dim=16,
        dim=dim,
        ffn_dim=ffn,
        freq_dim=256,
        text_dim=4096,
        out_dim=16,
        num_heads=heads,
        num_layers=layers,
        window_size=(-1, -1),
        qk_norm=True,
        cross_attn_norm=True,
        eps=1e-6,
    )
    patcher = _patcher(comfy.supported_models.WAN21_T2V, comfy.model_base.WAN21, unet, device, dtype)
    positive, negative = _text(4, tokens, 4096)
    latent_frames = (frames - 1) // 4 + 1
    latent = torch.zeros(1, 16, latent_frames, height // 8, width // 8)
    info = dict(
        size=f"{height}x{width}x{frames} frames",
        tokens=latent_frames * (height // 16) * (width // 16),
        depth=f"{layers} of 40 layers (Wan 2.1 14B)",
    )
    return Subject("wan", f"Wan 2.1-width transformer (dim {dim})", patcher, positive, negative, latent, 5.0,
                   "simple", info)  # fmt: skip


BUILDERS: dict[str, Callable[..., Subject]] = {"sd15": build_sd15, "sdxl": build_sdxl, "flux": build_flux,
                                               "wan": build_wan}  # fmt: skip
DEFAULT_DTYPES = {"sd15": torch.float16, "sdxl": torch.float16, "flux": torch.bfloat16, "wan": torch.bfloat16}


# --- variants ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    attention: dict | None = None  # Attention Map Reuse inputs over its defaults (None: not applied)
    encoder: dict | None = None  # Encoder Feature Propagation inputs over its defaults (None: not applied)


OUTPUT_MODE = dict(mode="output", memory_budget_mb=OUTPUT_BUDGET_MB)
VARIANTS = (
    Variant("baseline"),
    Variant("EFP defaults", encoder={}),
    Variant("EFP uniform k=4", encoder=dict(key_steps="uniform", uniform_k=4)),
    Variant("EFP uniform k=4 seq", encoder=dict(key_steps="uniform", uniform_k=4, parallel_decoding=False)),
    Variant("AMR defaults", attention={}),
    Variant("AMR output", attention=OUTPUT_MODE),
    # What a forecast costs on top of the same reuse (its extra snapshots, the extrapolation)
    Variant("AMR output + linear", attention={**OUTPUT_MODE, "forecast": "linear"}),
    Variant("EFP uniform k=4 + linear", encoder=dict(key_steps="uniform", uniform_k=4, forecast="linear")),
    Variant("AMR output + EFP defaults", attention=OUTPUT_MODE, encoder={}),
)


def pack_nodes(comfy_path=None) -> dict:
    """The two node classes of the pack, imported as ComfyUI would load it."""
    package = sd15_comfy.load_pack(comfy_path).__name__
    return {
        "attention": importlib.import_module(f"{package}.nodes.attention_node").AttentionMapReuse,
        "encoder": importlib.import_module(f"{package}.nodes.encoder_node").EncoderFeaturePropagation,
    }


def node_defaults(node) -> dict:
    return {i.id: i.default for i in node.define_schema().inputs if i.id != "model"}


def node_inputs(nodes: dict, variant: Variant) -> dict:
    """Per node the variant applies (attention first: the README's chain), its inputs: defaults + overrides."""
    return {
        kind: {**node_defaults(nodes[kind]), **overrides}
        for kind in ("attention", "encoder")
        if (overrides := getattr(variant, kind)) is not None
    }


def patched(nodes: dict, model, variant: Variant):
    for kind, inputs in node_inputs(nodes, variant).items():
        model = nodes[kind].execute(model=model, **inputs).result[0]
    return model


def describe(nodes: dict, variant: Variant) -> str:
    """The settings that matter, as the table shows them (from the inputs actually passed)."""
    parts = []
    for kind, i in node_inputs(nodes, variant).items():
        if kind == "attention":
            amount = f"fraction {i['reuse_fraction']:g}" if i["reuse_fraction"] > 0 else str(i["reuse_steps"])
            parts.append(f"AMR {i['strategy']} {amount}, {i['mode']} mode, {i['memory_budget_mb']} MB")
        else:
            keys = f"uniform k={i['uniform_k']}" if i["key_steps"] == "uniform" else i["key_steps"]
            parts.append(f"EFP {keys}, {'parallel' if i['parallel_decoding'] else 'sequential'} decoding")
    return " + ".join(parts) or "unpatched"


# --- one sampler run -----------------------------------------------------------------------------------------------


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """``APPLY_MODEL`` wrapper: seconds of model time per step of the current run, synchronised on the GPU."""

    def __init__(self, device):
        self.device = device
        self.times: dict[int, float] = {}

    def __call__(self, executor, *args, **kwargs):
        from reuse_core.steps import match_step

        options = kwargs.get("transformer_options")
        if not isinstance(options, dict):
            options = args[5] if len(args) > 5 and isinstance(args[5], dict) else {}
        _sync(self.device)
        start = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            _sync(self.device)
            elapsed = time.perf_counter() - start
            sigmas, sample_sigmas = options.get("sigmas"), options.get("sample_sigmas")
            found = sigmas is not None and sample_sigmas is not None
            step = match_step(sigmas, sample_sigmas).index if found else -1
            self.times[step] = self.times.get(step, 0.0) + elapsed


def with_timer(model, timer: StepTimer):
    import comfy.patcher_extension

    timed = model.clone()
    timed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TIMER_KEY, timer)
    return timed


class SummaryLines(logging.Handler):
    """Keeps the nodes' per-run summary lines (logged at INFO by both nodes when a run ends)."""

    def __init__(self, echo: bool = False):
        super().__init__(logging.INFO)
        self.echo = echo
        self.lines: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith(SUMMARY_PREFIXES):
            self.lines.append(message)
            if self.echo:
                print(f"  {message}", flush=True)


@contextmanager
def summary_lines(echo: bool = False):
    handler, root = SummaryLines(echo), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def parse_summaries(lines: list[str]) -> dict:
    """What one run reused, from the nodes' summary lines (``reuse_core``'s ``summary`` formats)."""
    out: dict = {}
    for line in lines:
        if m := re.search(r"key steps \[([0-9, ]*)\], encoder passes saved (\d+)/(\d+) calls", line):
            out["key_steps"] = [int(s) for s in m.group(1).replace(" ", "").split(",") if s]
            out["encoder_passes_saved"], out["model_calls"] = int(m.group(2)), int(m.group(3))
        if m := re.search(r"steps reused (\d+)/(\d+) \(schedule ([01]+)\)", line):
            out["attention_steps_reused"], out["schedule"] = int(m.group(1)), m.group(3)
        if m := re.search(r"memory ([0-9.]+) MiB", line):
            out["attention_cache_mib"] = float(m.group(1))
        if m := re.search(r"calls reused (\d+), stored (\d+), computed (\d+)", line):
            out["attention_calls_reused"], out["attention_calls_stored"] = int(m.group(1)), int(m.group(2))
            out["attention_calls_computed"] = int(m.group(3))
        if m := re.search(r"fallbacks (\d+), refused stores (\d+)", line):
            out["attention_fallbacks"], out["attention_refused_stores"] = int(m.group(1)), int(m.group(2))
    return out


@dataclass
class Run:
    wall_s: float
    step_s: list[float]
    peak_bytes: int | None
    latent: torch.Tensor
    lines: list[str]


def sample(subject: Subject, model, timer: StepTimer, log: SummaryLines, steps: int, seed: int = 0) -> Run:
    """One ``comfy.sample.sample`` run of ``model`` (carrying ``timer``) on ``subject``'s latent and conditioning."""
    import comfy.sample

    device = timer.device
    noise = comfy.sample.prepare_noise(subject.latent, seed)
    timer.times.clear()
    first_line = len(log.lines)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = comfy.sample.sample(
            model,
            noise,
            steps,
            subject.cfg,
            "euler",
            subject.scheduler,
            subject.positive,
            subject.negative,
            subject.latent,
            denoise=1.0,
            seed=seed,
            disable_pbar=True,
        )
    _sync(device)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    step_s = [timer.times.get(i, 0.0) for i in range(steps)]
    return Run(wall, step_s, peak, out.float().cpu(), log.lines[first_line:])


# --- one model -----------------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def step_kinds(runs: dict[str, list[Run]], results: dict[str, dict]) -> dict:
    """Median model time of each kind of step (seconds), from the runs' per-step times and what the nodes reused."""

    def picked(name: str, keep: Callable[[int], bool]) -> list[float]:
        return [t for run in runs.get(name, []) for i, t in enumerate(run.step_s) if keep(i)]

    kinds: dict = {"full_step_s": _median(picked("baseline", lambda i: True))}
    keys = results.get("EFP uniform k=4 seq", {}).get("reuse", {}).get("key_steps")
    if keys is not None:
        kinds["key_step_s"] = _median(picked("EFP uniform k=4 seq", lambda i: i in keys))
        kinds["decoder_only_step_s"] = _median(picked("EFP uniform k=4 seq", lambda i: i not in keys))
    schedule = results.get("AMR output", {}).get("reuse", {}).get("schedule")
    if schedule is not None:
        kinds["attention_compute_step_s"] = _median(picked("AMR output", lambda i: schedule[i] == "1"))
        kinds["attention_reuse_step_s"] = _median(picked("AMR output", lambda i: schedule[i] == "0"))
    full = kinds["full_step_s"]
    if full and kinds.get("decoder_only_step_s"):
        kinds["encoder_share"] = 1.0 - kinds["decoder_only_step_s"] / full
    if full and kinds.get("attention_reuse_step_s"):
        kinds["attention_reuse_vs_full"] = kinds["attention_reuse_step_s"] / full
    return kinds


def check_model(subject: Subject, nodes: dict, device, settings: dict, clock: Clock, echo: bool = False) -> dict:
    """Warm-up, then ``rounds`` interleaved rounds of every variant; the model's JSON entry. ``echo`` prints the
    nodes' summary lines as the runs end."""
    steps, rounds_asked = settings["steps"], settings["rounds"]
    timer = StepTimer(device)
    entry = dict(
        key=subject.key,
        model=subject.label,
        dtype=str(subject.patcher.model.get_dtype()).removeprefix("torch."),
        params=sum(p.numel() for p in subject.patcher.model.diffusion_model.parameters()),
        latent_shape=list(subject.latent.shape),
        steps=steps,
        cfg=subject.cfg,
        sampler=f"euler/{subject.scheduler}",
        **subject.info,
    )
    models, errors = {}, {}
    for variant in VARIANTS:
        try:
            models[variant.name] = with_timer(patched(nodes, subject.patcher, variant), timer)
        except Exception as exc:  # recorded in the table: one variant failing must not cost the others
            errors[variant.name] = f"{type(exc).__name__}: {exc}"
    runs: dict[str, list[Run]] = {name: [] for name in models}
    with summary_lines(echo) as log:
        start = time.perf_counter()
        warm = sample(subject, models["baseline"], timer, log, steps)
        entry["warmup_s"] = warm.wall_s
        round_cost = warm.wall_s * ROUND_COST
        affordable = math.floor((clock.limit_s - clock.elapsed()) / round_cost) if round_cost > 0 else rounds_asked
        rounds = min(rounds_asked, affordable)
        notes = []
        if rounds < 1:
            notes.append(
                f"warm-up only: one round (~{round_cost:.0f} s) would end after the {clock.limit_s:.0f} s limit"
            )
        elif rounds < rounds_asked:
            notes.append(f"rounds cut to {rounds} (time limit)")
        done = 0
        for r in range(max(rounds, 0)):
            round_start = time.perf_counter()
            for name, model in models.items():
                if name in errors:
                    continue
                try:
                    runs[name].append(sample(subject, model, timer, log, steps, seed=r))
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    runs[name] = []
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    print(f"  {subject.key}: {name} failed: {errors[name]}", flush=True)
            done += 1
            took = time.perf_counter() - round_start
            if r + 1 < rounds and clock.elapsed() + took > clock.limit_s:
                notes.append(f"stopped after {done} of {rounds} rounds (time limit)")
                break
        entry["rounds"] = done
        entry["model_s"] = time.perf_counter() - start
    baseline = runs.get("baseline", [])
    base_wall = _median([run.wall_s for run in baseline])
    results: dict[str, dict] = {}
    for variant in VARIANTS:
        row: dict = dict(variant=variant.name, settings=describe(nodes, variant), inputs=node_inputs(nodes, variant))
        done_runs = runs.get(variant.name, [])
        if variant.name in errors:
            row["error"] = errors[variant.name]
        if done_runs:
            wall = _median([run.wall_s for run in done_runs])
            peaks = [run.peak_bytes for run in done_runs if run.peak_bytes is not None]
            row.update(
                wall_s=wall,
                walls_s=[run.wall_s for run in done_runs],
                speedup=base_wall / wall if base_wall else None,
                peak_gib=_gib(max(peaks)) if peaks else None,
                reuse=parse_summaries(done_runs[-1].lines),
                summary_lines=done_runs[-1].lines,
                finite=bool(torch.isfinite(done_runs[-1].latent).all()),
            )
            if baseline:
                ref = baseline[-1].latent
                row["latent_rel_diff"] = float((done_runs[-1].latent - ref).norm() / ref.norm().clamp_min(1e-12))
        results[variant.name] = row
    entry["step_kinds"] = step_kinds(runs, results)
    entry["variants"] = list(results.values())
    head = "not timed" if not entry["rounds"] else "done with errors" if errors else "done"
    entry["status"] = "; ".join([head, *notes])
    return entry


# --- the whole check -----------------------------------------------------------------------------------------------


@dataclass
class Clock:
    budget_s: float
    limit_s: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def environment(comfy_path, device) -> dict:
    import comfy.ldm.modules.attention as attention
    import comfy.model_management as mm

    root = comfyui_env.find_comfyui(comfy_path)
    env = dict(
        python=sys.version.split()[0],
        torch=torch.__version__,
        cuda=torch.version.cuda,
        device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        gpu_memory_gib=_gib(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else None,
        comfyui=comfyui_env.comfyui_version(root) if root else "unknown",
        comfyui_path=str(root),
        attention=getattr(attention.optimized_attention, "__name__", str(attention.optimized_attention)),
        vram_state=getattr(mm.vram_state, "name", str(mm.vram_state)),
        standins=list(comfyui_env.standins_needed()),
    )
    try:
        import comfy.quant_ops

        backends = comfy.quant_ops.ck.list_backends()
        env["comfy_kitchen_backends"] = sorted(n for n, b in backends.items() if b["available"] and not b["disabled"])
    except Exception as exc:  # the backends are informational only
        env["comfy_kitchen_backends"] = f"unknown ({type(exc).__name__})"
    return env


def free_models(device) -> None:
    """Unload what ComfyUI holds and return the memory (the caller has dropped its own references)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(
    comfy_path=None,
    tiny: bool = False,
    *,
    models=MODELS,
    steps: int = STEPS,
    rounds: int = ROUNDS,
    budget_s: float = BUDGET_S,
    limit_s: float = LIMIT_S,
    dtype: str = "auto",
    flux_depth: tuple[int, int] = FLUX_DEPTH,
    wan_layers: int = WAN_LAYERS,
    wan_frames: int = WAN_FRAMES,
    out_dir: Path | None = None,
    echo: bool = False,
) -> dict:
    """The check; returns the JSON document (and writes it and the table to ``out_dir`` after every model)."""
    clock = Clock(budget_s, limit_s)
    gpu = torch.cuda.is_available() and not tiny
    if not gpu and not tiny:
        raise RuntimeError("gpu_check: no CUDA GPU here; --tiny runs the tiny models on the CPU")
    comfyui_env.import_comfy(comfy_path, fused_attention=True, cpu=not gpu)
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    if gpu and device.type != "cuda":
        raise RuntimeError(f"gpu_check: ComfyUI picked {device}, not the GPU: it was imported in CPU mode before")
    nodes = pack_nodes(comfy_path)
    rounds = 1 if tiny else rounds
    settings = dict(steps=steps, rounds=rounds, budget_s=budget_s, limit_s=limit_s, tiny=tiny, dtype=dtype)
    doc = dict(environment=environment(comfy_path, device), settings=settings, models=[])
    print(f"gpu_check: {doc['environment']}", flush=True)
    for key in models:
        if clock.elapsed() > budget_s:
            doc["models"].append(dict(key=key, status=f"not run: {clock.elapsed():.0f} s > budget {budget_s:.0f} s"))
            print(f"gpu_check: {key} not run (time budget)", flush=True)
            continue
        chosen = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
        model_dtype = chosen or (DEFAULT_DTYPES[key] if gpu else torch.float32)
        extra = {"flux": dict(depth=flux_depth), "wan": dict(layers=wan_layers, frames=wan_frames)}.get(key, {})
        subject = None
        print(f"gpu_check: {key} at {clock.elapsed():.0f} s", flush=True)
        try:
            before = torch.cuda.memory_allocated(device) if gpu else 0
            subject = BUILDERS[key](device, model_dtype, tiny, **extra)
            if gpu:
                subject.info["weights_gib"] = _gib(torch.cuda.memory_allocated(device) - before)
                subject.info["allocated_before_gib"] = _gib(before)  # what earlier models left behind (expect ~0)
            entry = check_model(subject, nodes, device, settings, clock, echo=echo)
        except Exception as exc:  # one model failing must not cost the others
            entry = dict(key=key, status=f"failed: {type(exc).__name__}: {exc}")
            logging.exception("gpu_check: %s failed", key)
        entry["finished_at_s"] = clock.elapsed()
        doc["models"].append(entry)
        subject = None
        free_models(device)
        doc["elapsed_s"] = clock.elapsed()
        if out_dir is not None:
            write(doc, out_dir)
        print(markdown_model(entry), flush=True)
    doc["elapsed_s"] = clock.elapsed()
    if out_dir is not None:
        write(doc, out_dir)
    return doc


# --- output --------------------------------------------------------------------------------------------------------


def _num(value, fmt: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


def _ms(value) -> str:
    return _num(None if value is None else value * 1000, ".1f")


def _reuse_text(reuse: dict) -> str:
    parts = []
    if "encoder_passes_saved" in reuse:
        parts.append(f"encoder passes saved {reuse['encoder_passes_saved']}/{reuse['model_calls']}")
    if "attention_steps_reused" in reuse:
        calls = reuse.get("attention_calls_reused", 0)
        text = f"attention reused {reuse['attention_steps_reused']} steps, {calls} calls"
        if reuse.get("attention_refused_stores"):
            text += f", {reuse['attention_refused_stores']} stores refused (budget)"
        parts.append(text)
    return "; ".join(parts) or "–"


def markdown_model(entry: dict) -> str:
    """One model's end-to-end table (also printed as the check goes)."""
    if "variants" not in entry:
        return f"{entry['key']}: {entry['status']}"
    lines = [
        f"{entry['model']}, {entry['size']}, {entry['dtype']}, {entry['steps']} steps, median of {entry['rounds']} "
        f"rounds ({entry['status']})",
        "",
        "| variant | settings | wall (s) | speed-up | peak GPU memory (GiB) | what was reused |",
        "|---|---|---|---|---|---|",
    ]
    for row in entry["variants"]:
        if "wall_s" not in row:
            what = f"failed: {row['error']}" if "error" in row else "not run"
            lines.append(f"| {row['variant']} | {row['settings']} | {what} | | | |")
            continue
        lines.append(
            f"| {row['variant']} | {row['settings']} | {row['wall_s']:.3f} | {_num(row['speedup'], '.2f', 'x')} "
            f"| {_num(row['peak_gib'])} | {_reuse_text(row['reuse'])} |"
        )
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    env, settings = doc["environment"], doc["settings"]
    standins = f", stand-ins: {', '.join(env['standins'])}" if env["standins"] else ""
    lines = [
        f"# GPU check: {env['gpu'] or env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}, ComfyUI {env['comfyui']} in process "
        f"({env['vram_state']}), attention `{env['attention']}`, comfy_kitchen backends "
        f"{env['comfy_kitchen_backends']}{standins}. {settings['steps']} euler steps per run, random weights; "
        f"{doc.get('elapsed_s', 0):.0f} s in all (budget {settings['budget_s']:.0f} s to start a model, limit "
        f"{settings['limit_s']:.0f} s).",
        "",
        "## Models",
        "",
        "| model | depth | size | tokens | dtype | parameters | weights (GiB) | cfg | rounds | time (s) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in doc["models"]:
        if "params" not in m:
            lines.append(f"| {m['key']} | | | | | | | | | | {m['status']} |")
            continue
        lines.append(
            f"| {m['model']} | {m['depth']} | {m['size']} | {m['tokens']} | {m['dtype']} | {m['params'] / 1e6:,.1f} M "
            f"| {_num(m.get('weights_gib'))} | {m['cfg']:g} | {m.get('rounds', 0)} | {_num(m.get('model_s'), '.0f')} "
            f"| {m['status']} |"
        )
    lines += [
        "",
        "## Time per step kind (one model call per step, median, ms)",
        "",
        "| model | full step | EFP key step | EFP decoder-only step | encoder share | AMR output compute step "
        "| AMR output reuse step | reuse / full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in doc["models"]:
        k = m.get("step_kinds")
        if not k:
            continue
        lines.append(
            f"| {m['key']} | {_ms(k.get('full_step_s'))} | {_ms(k.get('key_step_s'))} "
            f"| {_ms(k.get('decoder_only_step_s'))} | {_num(k.get('encoder_share'), '.1%')} "
            f"| {_ms(k.get('attention_compute_step_s'))} | {_ms(k.get('attention_reuse_step_s'))} "
            f"| {_num(k.get('attention_reuse_vs_full'), '.2f')} |"
        )
    lines += ["", "## End to end", ""]
    for m in doc["models"]:
        if "variants" in m:
            lines += [markdown_model(m), ""]
    return "\n".join(lines).rstrip() + "\n"


def write(doc: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / "gpu_check.md").write_text(markdown(doc))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/gpu_check"), help="folder for gpu_check.json/.md")
    parser.add_argument("--comfyui", default=None, help="ComfyUI tree (default: COMFYUI_PATH, ../shared/comfyui)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths on the CPU, one round: checks the code paths")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models, in order")
    parser.add_argument("--steps", type=int, default=STEPS, help="sampling steps per run")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds per model (median)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no model after this many seconds")
    parser.add_argument("--limit-s", type=float, default=LIMIT_S, help="cut a model's rounds to end before this")
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                        help="weights (auto: fp16 U-Nets, bf16 transformers on the GPU; fp32 on the CPU)")  # fmt: skip
    parser.add_argument("--flux-depth", type=int, nargs=2, default=FLUX_DEPTH, metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--wan-layers", type=int, default=WAN_LAYERS)
    parser.add_argument("--wan-frames", type=int, default=WAN_FRAMES, help="pixel frames (4n + 1)")
    args = parser.parse_args(argv)
    doc = run(
        args.comfyui,
        args.tiny,
        models=tuple(args.models),
        steps=args.steps,
        rounds=args.rounds,
        budget_s=args.budget_s,
        limit_s=args.limit_s,
        dtype=args.dtype,
        flux_depth=tuple(args.flux_depth),
        wan_layers=args.wan_layers,
        wan_frames=args.wan_frames,
        out_dir=args.out,
        echo=True,
    )
    print(markdown(doc), flush=True)
    print(f"gpu_check: wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}", flush=True)
    return doc


def console_logging() -> None:
    """Warnings and errors on stderr; ComfyUI's INFO lines (one "Requested to load" per run) stay out of the log,
    the nodes' summary lines are printed by ``SummaryLines``."""
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(handlers=[handler], force=True)


if __name__ == "__main__":
    console_logging()
    main()
