"""Calibrated and adaptive schedules against "just use fewer steps": ``python -m reuse_bench.calibration_curves``.

On each built-in model (the MNIST U-Net with DDIM, the MNIST DiT with Euler; both with CFG), against the
full-compute output of the same seed (PSNR of the final images in [0, 1], mean over the evaluation images):

* the fewer-steps curve: the same sampler with every step count from ``reference // 4`` to the reference;
* per method a curve of settings: Encoder Feature Propagation (sequential, no noise injection, so that every
  difference from the reference is the reuse) with its presets, calibrated key steps for several budgets and
  adaptive key steps for several thresholds; Attention Map Reuse (output mode) with HURRY, the PHAST preset and
  calibrated schedules for several reuse counts;
* the same with ``forecast = linear`` (``preset+forecast``: the presets, HURRY; ``calibrated+forecast``: key steps and
  schedules fitted to a linear forecast's error, as Reuse Calibrate fits them with that forecast);
* per model and method the best PSNR gain over fewer steps at equal cost (``equal_cost_psnr``: the fewer-steps
  curve's upper envelope, linear in cost);
* on the U-Net, calibrated against PHAST's exhaustive search (``assets/phast_schedules.json``) at 20 steps / 10
  reuse in both attention modes: PSNR, and cost in sampling runs.

Cost: model FLOPs per run, from FLOPs counted once per kind of step (``measure.count_flops`` on one full step, one
decoder-only step, one attention-reuse step per mode) times how many steps of each kind a setting runs: exact for
these deterministic steps and unaffected by other processes on the machine. Map-mode store steps are counted as
full steps. Wall time of each run is recorded too but is only meaningful on an otherwise idle machine.

Calibration (``reuse_core.calibration``, drift weighted by the sigma step as the node does) records one
full-compute run on the PHAST search's seeds and classes (``phast_search.SEARCH_SEEDS``, disjoint from the evaluation
seeds), as PHAST itself was searched, so neither sees the images it is scored on.

The DiT is included when its weights load; otherwise the report says why not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from reuse_core.adapters.diffusers_attention import DiffusersAttentionReuse
from reuse_core.adapters.diffusers_encoder import DiffusersUNetHost
from reuse_core.adapters.diffusers_transformer import DiffusersFluxHost
from reuse_core.attention_engine import AttentionReuseConfig
from reuse_core.calibration import ATTENTION_OUTPUT, ComputeSteps, fit_compute_steps
from reuse_core.encoder_engine import EncoderPropagationConfig
from reuse_core.forecast import ForecastSpec
from reuse_core.key_steps import KeyStepSpec
from reuse_core.metrics import psnr
from reuse_core.schedules import ReuseSchedule, hurry, parse_bits, phast_preset

from . import phast_search
from .builtin_dit import WEIGHTS_PATH as DIT_WEIGHTS
from .builtin_dit import BuiltinDiT, flow_sigmas, load_builtin_dit, pack, position_ids
from .builtin_model import NULL_CLASS, BuiltinModel, load_builtin_model
from .measure import count_flops, wall_time
from .methods import (
    AttentionReusePredictor,
    EncoderPropagationPredictor,
    RecordingPredictor,
    attention_config,
    calibrated_key_steps,
    calibrated_schedule,
    drift_matrices,
)
from .methods_dit import AttentionReuseDiTPredictor, EncoderPropagationDiTPredictor, RecordingDiTPredictor
from .sampling import SampleSpec, StepPredictor, ddim_sigmas, initial_noise, sample, to_unit_range
from .sampling_dit import DiTPredictor, DiTSampleSpec, sample_dit

OUT_DIR = Path("bench_out")
# The forecast points' order (linear, as the main job's forecast rows) and the kinds of point, in the table's order.
FORECAST = 1
KINDS = ("preset", "calibrated", "adaptive", "phast", "preset+forecast", "calibrated+forecast")


@dataclass(frozen=True)
class CurveSettings:
    quick: bool
    labels: tuple[int, ...]
    seeds: tuple[int, ...]
    encoder_steps: int  # reference step count of the Encoder Feature Propagation curve
    attention_steps: int  # reference step count of the Attention Map Reuse curve (PHAST's 20)
    key_budgets: tuple[int, ...]  # calibrated key-step counts (at encoder_steps)
    thresholds: tuple[float, ...]  # adaptive thresholds
    reuse_counts: tuple[int, ...]  # calibrated / HURRY reuse counts (at attention_steps)

    @classmethod
    def for_mode(cls, quick: bool) -> CurveSettings:
        if quick:
            return cls(True, (0, 3, 7, 9), (0, 1, 2, 3), 20, 20, (4, 6, 8, 11), (0.1, 0.25, 0.5, 1.0), (4, 7, 10, 13))
        return cls(
            False, tuple(range(10)), tuple(range(10)), 50, 20,
            (5, 7, 9, 12, 15, 20, 25, 32), (0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.2), (2, 4, 6, 8, 10, 12, 14),
        )  # fmt: skip


@dataclass
class Point:
    model: str  # CurveSubject.name
    method: str  # "fewer steps", "encoder", "attention"
    kind: str  # fewer, preset, calibrated, adaptive, phast
    label: str
    flops_ratio: float  # model FLOPs / the reference run's
    psnr: float
    wall_s: float
    detail: dict = field(default_factory=dict)
    gain_db: float | None = None  # over fewer steps at equal FLOPs


@dataclass(frozen=True)
class CurveSubject:
    """One built-in model as the curves use it: how it samples, runs each method, records a run and costs a step."""

    name: str  # "U-Net", "DiT"
    sampler: str  # the fewer-steps baseline's sampler
    # (labels, seeds, steps, predictor or None = full compute) -> final images in about [-1, 1]
    sample: Callable[[Sequence[int], Sequence[int], int, object | None], torch.Tensor]
    plain: Callable[[], object]  # the full-compute predictor
    encoder: Callable[[EncoderPropagationConfig], object]  # predictors with an ``engine``
    attention: Callable[[AttentionReuseConfig, ReuseSchedule], object]
    recorder: Callable[[], object]  # full compute recording ``encoder`` / ``attention`` ChangeRecorders
    sigmas: Callable[[int], list[float]]  # the run's sigmas in ComfyUI's parameterisation (steps + 1, ending at 0)
    flops: dict[str, int]  # per kind of step: full, decoder, reuse_map, reuse_output
    phast: dict = field(default_factory=dict)  # stored PHAST searches on this model (the U-Net only)


# Recording one full run --------------------------------------------------------------------------------------------
def record_drift(subject: CurveSubject, steps: int) -> dict:
    """``drift_matrices`` of one recorded run, plus the recordings themselves (``trajectories``: encoder, output) that
    a fit to a forecast's error reads."""
    recorder = subject.recorder()
    subject.sample(phast_search.SEARCH_LABELS, phast_search.SEARCH_SEEDS, steps, recorder)
    trajectories = {
        "encoder": recorder.encoder.trajectory(steps),
        "output": recorder.attention.trajectory(steps, recorder.attention.names(ATTENTION_OUTPUT)),
    }
    return {**drift_matrices(recorder, subject.sigmas(steps)), "trajectories": trajectories}


def forecast_fit(drift: dict, source: str, budget: int) -> ComputeSteps:
    """``budget`` compute steps fitted to a linear forecast's error on the recorded ``source`` (Reuse Calibrate's)."""
    return fit_compute_steps(drift["trajectories"][source], budget, FORECAST, weights=drift["weights"])


# FLOPs per kind of step ----------------------------------------------------------------------------------------------
@torch.no_grad()
def reuse_step_flops(module: torch.nn.Module, forward: Callable[[], object]) -> dict[str, int]:
    """FLOPs of ``forward()`` at an attention reuse step of each mode, after a store step."""
    flops = {}
    for mode in ("map", "output"):
        adapter = DiffusersAttentionReuse(module, attention_config(mode), ReuseSchedule((1, 0))).install()
        try:
            adapter.set_step(0)
            forward()
            adapter.set_step(1)
            _, flops[f"reuse_{mode}"] = count_flops(forward)
        finally:
            adapter.remove()
    return flops


@torch.no_grad()
def unet_step_flops(model: BuiltinModel, rows: int) -> dict[str, int]:
    """Model FLOPs of one step of each kind, for a CFG batch of ``rows`` images."""
    x = torch.cat([initial_noise(range(rows))] * 2)
    labels = torch.arange(rows) % 10
    context = model.context(torch.cat([torch.full_like(labels, NULL_CLASS), labels]))
    t = torch.full((2 * rows,), 500)
    host = DiffusersUNetHost(model.unet)

    def forward():
        return model.unet(x, t, encoder_hidden_states=context).sample

    _, full = count_flops(forward)
    features = host.encode(x, t, context)
    _, decoder = count_flops(lambda: host.decode(features, t, context))
    return {"full": full, "decoder": decoder, **reuse_step_flops(model.unet, forward)}


def unet_subject(rows: int) -> CurveSubject:
    model = load_builtin_model()

    def run(labels, seeds, steps, predictor=None):
        return sample(model, SampleSpec(tuple(labels), tuple(seeds), steps), predictor)

    return CurveSubject(
        "U-Net", "DDIM", run,
        plain=lambda: StepPredictor(model),
        encoder=lambda config: EncoderPropagationPredictor(model, config),
        attention=lambda config, schedule: AttentionReusePredictor(model, config, schedule),
        recorder=lambda: RecordingPredictor(model),
        sigmas=ddim_sigmas,
        flops=unet_step_flops(model, rows),
        phast=phast_search.load_stored(),
    )  # fmt: skip


@torch.no_grad()
def dit_step_flops(model: BuiltinDiT, rows: int) -> dict[str, int]:
    """Model FLOPs of one step of each kind, for a CFG batch of ``rows`` images."""
    x = torch.cat([initial_noise(range(rows))] * 2)
    labels = torch.arange(rows) % 10
    text, pooled = model.conds(torch.cat([torch.full_like(labels, NULL_CLASS), labels]))
    sigma = torch.full((2 * rows,), 0.5)
    img_ids, txt_ids = position_ids()
    extra = {"pooled_projections": pooled, "img_ids": img_ids, "txt_ids": txt_ids}
    host = DiffusersFluxHost(model.transformer)  # the encoder points' default split

    def forward():
        return model.velocity(x, sigma, text, pooled)

    _, full = count_flops(forward)
    features = host.encode(pack(x), sigma, text, **extra)
    _, decoder = count_flops(lambda: host.decode(features, sigma, text, **extra))
    return {"full": full, "decoder": decoder, **reuse_step_flops(model.transformer, forward)}


def dit_subject(rows: int) -> CurveSubject | str:
    """The built-in DiT's subject, or why it is not available."""
    if not DIT_WEIGHTS.is_file():
        return f"not measured: {DIT_WEIGHTS.name} is missing (python -m reuse_bench.train_mnist_dit)"
    model = load_builtin_dit()

    def run(labels, seeds, steps, predictor=None):
        return sample_dit(model, DiTSampleSpec(tuple(labels), tuple(seeds), steps), predictor)

    return CurveSubject(
        "DiT", "Euler", run,
        plain=lambda: DiTPredictor(model),
        encoder=lambda config: EncoderPropagationDiTPredictor(model, config),
        attention=lambda config, schedule: AttentionReuseDiTPredictor(model, config, schedule),
        recorder=lambda: RecordingDiTPredictor(model),
        sigmas=lambda steps: flow_sigmas(steps).tolist(),
        flops=dit_step_flops(model, rows),
    )  # fmt: skip


# Runs -----------------------------------------------------------------------------------------------------------
def keys_recorded(predictor):
    """``predictor`` (an Encoder Feature Propagation predictor) keeping its run's key steps in ``.keys`` at its end."""
    end = predictor.end

    def end_recording_keys():
        predictor.keys = tuple(sorted(predictor.engine.stats.full_steps))
        end()

    predictor.end = end_recording_keys
    return predictor


def encoder_config(spec: KeyStepSpec, forecast: int = 0) -> EncoderPropagationConfig:
    return EncoderPropagationConfig(key_steps=spec, parallel_decoding=False, forecast=ForecastSpec(forecast))


def evaluate(subject: CurveSubject, settings: CurveSettings, steps: int, predictor, reference) -> tuple[float, float]:
    images, wall = wall_time(lambda: subject.sample(settings.labels, settings.seeds, steps, predictor))
    img, ref = to_unit_range(images), to_unit_range(reference)
    return statistics.fmean(psnr(img[i], ref[i], data_range=1.0) for i in range(len(img))), wall


def fewer_steps_curve(subject: CurveSubject, settings: CurveSettings, steps: int, reference, log) -> list[Point]:
    points = []
    for k in range(max(2, steps // 4), steps + 1):
        if k < steps:
            value, wall = evaluate(subject, settings, k, subject.plain(), reference)
        else:
            value, wall = math.inf, 0.0
        points.append(Point(subject.name, "fewer steps", "fewer", f"{subject.sampler} {k}", k / steps, value, wall))
        log(f"  {subject.sampler} {k}: {value:.2f} dB")
    return points


def equal_cost_psnr(curve: list[Point], cost: float) -> float | None:
    """The best PSNR fewer steps reach at ``cost``; None outside the curve's finite part.

    The baseline is the curve's upper envelope (the best step count at no more cost), linear between step counts:
    the curve is not monotone (against a 50-step reference, DDIM with 46 or 48 steps is 8-11 dB worse than with 45 or
    47), and nobody would pay for a step count that does worse than a cheaper one."""
    envelope, best = [], -math.inf
    for p in sorted((p for p in curve if math.isfinite(p.psnr)), key=lambda p: p.flops_ratio):
        best = max(best, p.psnr)
        envelope.append((p.flops_ratio, best))
    for (c0, v0), (c1, v1) in itertools.pairwise(envelope):
        if c0 <= cost <= c1:
            return v0 + (v1 - v0) * (cost - c0) / (c1 - c0)
    return None


def encoder_points(subject: CurveSubject, settings: CurveSettings, reference, drift, log) -> list[Point]:
    n, flops = settings.encoder_steps, subject.flops
    runs: list[tuple[str, str, KeyStepSpec]] = [
        ("preset", "paper preset", KeyStepSpec("paper")),
        *[("preset", f"uniform k={k}", KeyStepSpec("uniform", k=k)) for k in (2, 3, 4)],
    ]
    for budget in settings.key_budgets:
        keys = calibrated_key_steps(drift, budget)
        runs.append(("calibrated", f"calibrated {budget} keys", KeyStepSpec("custom", custom=keys)))
    runs += [("adaptive", f"adaptive {t:g}", KeyStepSpec("adaptive", threshold=t)) for t in settings.thresholds]
    # The same presets with a linear forecast, and key steps fitted to its error (Reuse Calibrate with forecast linear)
    runs += [("preset+forecast", f"{label}, forecast linear", keys) for kind, label, keys in runs if kind == "preset"]
    for budget in settings.key_budgets:
        keys = forecast_fit(drift, "encoder", budget).steps
        runs.append(("calibrated+forecast", f"calibrated {budget} keys, forecast linear",
                     KeyStepSpec("custom", custom=keys)))  # fmt: skip
    points = []
    for kind, label, keys in runs:
        forecast = FORECAST if kind.endswith("+forecast") else 0
        predictor = keys_recorded(subject.encoder(encoder_config(keys, forecast)))
        value, wall = evaluate(subject, settings, n, predictor, reference)
        count = len(predictor.keys)
        cost = (count * flops["full"] + (n - count) * flops["decoder"]) / (n * flops["full"])
        detail = {"key_steps": list(predictor.keys), "forecast": ForecastSpec(forecast).name}
        points.append(Point(subject.name, "encoder", kind, label, cost, value, wall, detail))
        log(f"  {label}: {count} keys, {cost:.3f}x FLOPs, {value:.2f} dB")
    return points


def attention_points(subject: CurveSubject, settings: CurveSettings, reference, drift, log) -> list[Point]:
    n, flops = settings.attention_steps, subject.flops
    runs: list[tuple[str, str, str, ReuseSchedule]] = []
    for r in settings.reuse_counts:
        runs.append(("preset", f"HURRY r={r}", "output", hurry(n, r)))
        runs.append(("calibrated", f"calibrated r={r}", "output", calibrated_schedule(drift, r)))
        runs.append(("preset+forecast", f"HURRY r={r}, forecast linear", "output", hurry(n, r)))
        runs.append(("calibrated+forecast", f"calibrated r={r}, forecast linear", "output",
                     forecast_fit(drift, "output", n - r).schedule(n)))  # fmt: skip
    if n == phast_search.SEARCH_STEPS:  # PHAST's setting: its preset, and its search where this model has one
        reuse = phast_search.SEARCH_REUSE
        runs.append(("preset", f"PHAST preset r={reuse}", "output", phast_preset(n, reuse)))
        for mode in ("map", "output"):
            calibrated = calibrated_schedule(drift, reuse, mode)
            runs.append(("calibrated", f"calibrated r={reuse} ({mode})", mode, calibrated))
            if mode in subject.phast:
                schedule = parse_bits(subject.phast[mode]["schedule"])
                runs.append(("phast", f"PHAST searched r={reuse} ({mode})", mode, schedule))
    points = []
    for kind, label, mode, schedule in runs:
        forecast = FORECAST if kind.endswith("+forecast") else 0
        predictor = subject.attention(attention_config(mode, forecast), schedule)
        value, wall = evaluate(subject, settings, n, predictor, reference)
        reuse = schedule.reuse_count
        cost = ((n - reuse) * flops["full"] + reuse * flops[f"reuse_{mode}"]) / (n * flops["full"])
        detail = {"schedule": str(schedule), "mode": mode, "forecast": ForecastSpec(forecast).name}
        points.append(Point(subject.name, "attention", kind, label, cost, value, wall, detail))
        log(f"  {label}: {schedule}, {cost:.3f}x FLOPs, {value:.2f} dB")
    return points


def method_steps(settings: CurveSettings) -> tuple[tuple[str, int], ...]:
    return (("encoder", settings.encoder_steps), ("attention", settings.attention_steps))


def summarise(points: list[Point], fewer: dict[tuple[str, int], list[Point]], settings: CurveSettings) -> list[dict]:
    rows = []
    for model in dict.fromkeys(p.model for p in points):
        for method, steps in method_steps(settings):
            chosen = [p for p in points if p.model == model and p.method == method]
            for p in chosen:
                base = equal_cost_psnr(fewer[model, steps], p.flops_ratio)
                p.gain_db = None if base is None else p.psnr - base
            for kind in KINDS:
                scored = [p for p in chosen if p.kind == kind and p.gain_db is not None]
                if scored:
                    best = max(scored, key=lambda p: p.gain_db)
                    rows.append({
                        "model": model, "method": method, "kind": kind, "best": best.label,
                        "gain_db": best.gain_db, "psnr": best.psnr, "flops_ratio": best.flops_ratio,
                    })  # fmt: skip
    return rows


def plot(points: list[Point], fewer: dict[tuple[str, int], list[Point]], settings: CurveSettings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(model, method, steps) for model in dict.fromkeys(p.model for p in points)
              for method, steps in method_steps(settings)]  # fmt: skip
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4.5 * len(panels)), squeeze=False)
    markers = dict(zip(KINDS, ("s", "o", "^", "*", "D", "P"), strict=True))
    for row, (model, method, steps) in enumerate(panels):
        curve = [p for p in fewer[model, steps] if math.isfinite(p.psnr)]
        for col, (axis, key) in enumerate((("model FLOPs / reference", "flops_ratio"), ("wall s", "wall_s"))):
            ax = axes[row][col]
            ax.plot([getattr(p, key) for p in curve], [p.psnr for p in curve], "k-", label="fewer steps")
            for kind, marker in markers.items():
                chosen = [p for p in points if p.model == model and p.method == method and p.kind == kind]
                if chosen:
                    ax.scatter([getattr(p, key) for p in chosen], [p.psnr for p in chosen], marker=marker, label=kind)
            ax.set_xlabel(axis)
            ax.set_ylabel("PSNR dB vs full compute")
            ax.set_title(f"{model}: {method} ({steps}-step reference)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@dataclass
class Curves:
    points: list[Point]  # every reuse setting
    fewer: dict[tuple[str, int], list[Point]]  # (model, reference steps) -> the fewer-steps curve
    best_gain: list[dict]  # per model, method and kind: the best gain over fewer steps
    vs_phast: list[dict]  # calibrated against PHAST's search

    def as_json(self, settings: CurveSettings, subjects: Sequence[CurveSubject]) -> dict:
        return {
            "settings": asdict(settings),
            "step_flops": {subject.name: subject.flops for subject in subjects},
            "points": [asdict(p) for p in self.points],
            "fewer_steps": {f"{m} {steps}": [asdict(p) for p in curve] for (m, steps), curve in self.fewer.items()},
            "best_gain": self.best_gain,
            "vs_phast": self.vs_phast,
        }


def run_curves(subjects: Sequence[CurveSubject], settings: CurveSettings, log) -> Curves:
    """Every curve of every subject, the best gains and the PHAST comparison."""
    points: list[Point] = []
    fewer: dict[tuple[str, int], list[Point]] = {}
    for subject in subjects:
        log(f"{subject.name}: FLOPs per step {subject.flops}")
        references, drifts = {}, {}
        for steps in sorted({settings.encoder_steps, settings.attention_steps}):
            references[steps] = subject.sample(settings.labels, settings.seeds, steps, None)
            log(f"{subject.name}: fewer steps against {subject.sampler} {steps}:")
            fewer[subject.name, steps] = fewer_steps_curve(subject, settings, steps, references[steps], log)
            drifts[steps] = record_drift(subject, steps)
        log(f"{subject.name}: Encoder Feature Propagation:")
        n = settings.encoder_steps
        points += encoder_points(subject, settings, references[n], drifts[n], log)
        log(f"{subject.name}: Attention Map Reuse:")
        n = settings.attention_steps
        points += attention_points(subject, settings, references[n], drifts[n], log)
    table = summarise(points, fewer, settings)
    vs_phast = []
    for subject in subjects:
        for mode in ("map", "output"):
            label = f"r={phast_search.SEARCH_REUSE} ({mode})"
            found = {p.kind: p for p in points if p.model == subject.name and p.label.endswith(label)}
            if {"calibrated", "phast"} <= set(found):
                calibrated, searched = found["calibrated"], found["phast"]
                vs_phast.append({
                    "model": subject.name, "mode": mode,
                    "calibrated_psnr": calibrated.psnr, "phast_psnr": searched.psnr,
                    "calibrated_schedule": calibrated.detail["schedule"], "phast_schedule": searched.detail["schedule"],
                    "calibrated_runs": 1, "phast_runs": subject.phast[mode]["evaluations"],
                })  # fmt: skip
    return Curves(points, fewer, table, vs_phast)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 images, 20-step references, fewer settings (~3 min)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = CurveSettings.for_mode(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(text, flush=True)

    rows = len(settings.labels)
    subjects = [unet_subject(rows)]
    dit = dit_subject(rows)
    if isinstance(dit, str):
        log(f"built-in DiT: {dit}")
    else:
        subjects.append(dit)
    curves = run_curves(subjects, settings, log)
    result = {**curves.as_json(settings, subjects), "builtin_dit": dit if isinstance(dit, str) else "measured"}
    name = "calibration_curves_quick" if args.quick else "calibration_curves"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))
    plot(curves.points, curves.fewer, settings, args.out / f"{name}.png")
    log("\nbest PSNR gain over fewer steps at equal model FLOPs:")
    log("| model | method | kind | best setting | FLOPs | PSNR dB | gain dB |")
    log("|---|---|---|---|---|---|---|")
    for row in result["best_gain"]:
        log(f"| {row['model']} | {row['method']} | {row['kind']} | {row['best']} | {row['flops_ratio']:.3f}x | "
            f"{row['psnr']:.2f} | {row['gain_db']:+.2f} |")  # fmt: skip
    for row in result["vs_phast"]:
        gap = row["calibrated_psnr"] - row["phast_psnr"]
        log(f"calibrated vs PHAST ({row['model']}, {row['mode']}): {row['calibrated_psnr']:.2f} dB "
            f"({row['calibrated_runs']} run) vs {row['phast_psnr']:.2f} dB ({row['phast_runs']} runs): "
            f"{gap:+.2f} dB")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
