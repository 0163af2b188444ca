"""Calibrated and adaptive schedules against "just use fewer steps": ``python -m reuse_bench.calibration_curves``.

On the built-in MNIST U-Net (DDIM, CFG), against the full-compute output of the same seed (PSNR of the final images
in [0, 1], mean over the evaluation images):

* the fewer-steps curve: DDIM with every step count from ``reference // 4`` to the reference;
* per method a curve of settings: Encoder Feature Propagation (sequential, no noise injection, so that every
  difference from the reference is the reuse) with its presets, calibrated key steps for several budgets and
  adaptive key steps for several thresholds; Attention Map Reuse (output mode) with HURRY, the PHAST preset and
  calibrated schedules for several reuse counts;
* per method the best PSNR gain over fewer steps at equal cost (the fewer-steps curve interpolated linearly in cost);
* calibrated against PHAST's exhaustive search (``assets/phast_schedules.json``) at 20 steps / 10 reuse in both
  attention modes: PSNR, and cost in sampling runs.

Cost: model FLOPs per run, from FLOPs counted once per kind of step (``measure.count_flops`` on one full step, one
decoder-only step, one attention-reuse step per mode) times how many steps of each kind a setting runs: exact for
these deterministic steps and unaffected by other processes on the machine. Map-mode store steps are counted as
full steps. Wall time of each run is recorded too but is only meaningful on an otherwise idle machine.

Calibration (``reuse_core.calibration``, drift weighted by the sigma step as the node does) records one
full-compute run on the PHAST search's seeds and classes (``phast_search.SEARCH_SEEDS``, disjoint from the evaluation
seeds), as PHAST itself was searched, so neither sees the images it is scored on.

The built-in DiT (``builtin_dit.py``) is included when its weights load; otherwise the report says why not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from reuse_core.adapters.diffusers_attention import DiffusersAttentionReuse
from reuse_core.adapters.diffusers_encoder import DiffusersUNetHost
from reuse_core.calibration import ChangeRecorder, attention_probe, optimal_compute_steps, sigma_step_weights
from reuse_core.encoder_engine import EncoderPropagationConfig
from reuse_core.key_steps import KeyStepSpec
from reuse_core.metrics import psnr
from reuse_core.schedules import ReuseSchedule, hurry, parse_bits, phast_preset

from . import phast_search
from .builtin_model import NULL_CLASS, BuiltinModel, build_scheduler, load_builtin_model
from .measure import count_flops, wall_time
from .methods import AttentionReusePredictor, EncoderPropagationPredictor, attention_config
from .sampling import DEFAULT_GUIDANCE, SampleSpec, StepPredictor, initial_noise, sample, to_unit_range

OUT_DIR = Path("bench_out")


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
    method: str  # "fewer steps", "encoder", "attention"
    kind: str  # fewer, preset, calibrated, adaptive, phast
    label: str
    flops_ratio: float  # model FLOPs / the reference run's
    psnr: float
    wall_s: float
    detail: dict = field(default_factory=dict)
    gain_db: float | None = None  # over fewer steps at equal FLOPs


# Recording one full run --------------------------------------------------------------------------------------------
class _RecordingRun:
    """Stands in for ``AttentionReuseRun`` inside the diffusers adapter: computes, and records every call."""

    def __init__(self, recorder: ChangeRecorder):
        self.recorder = recorder

    def attention(self, fused, q, k, v, *, heads, step, layer_key, **_):
        out = fused()
        if step is not None:
            self.recorder.record(step, ("output", layer_key), out)
            self.recorder.record(step, ("map", layer_key), attention_probe(q, k))
        return out

    def reset(self) -> None:
        pass


class RecordingPredictor(StepPredictor):
    """Full compute; records the encoder features (skips + middle) and every attention call of each step."""

    def __init__(self, model: BuiltinModel):
        super().__init__(model)
        self.host = DiffusersUNetHost(model.unet)
        self.encoder, self.attention = ChangeRecorder(), ChangeRecorder()

    def begin(self, timesteps):
        self.adapter = DiffusersAttentionReuse(self.model.unet, attention_config("output"), hurry(len(timesteps), 0))
        self.adapter.run = _RecordingRun(self.attention)
        self.adapter.install()

    def predict(self, step, x, t, context):
        self.adapter.set_step(step)
        out, features = self.host.full_forward(x, t.expand(x.shape[0]), context, capture=True)
        for i, skip in enumerate(features.skips):
            self.encoder.record(step, ("skip", i), skip)
        self.encoder.record(step, "middle", features.middle)
        return out

    def end(self):
        self.adapter.remove()


def record_drift(model: BuiltinModel, steps: int) -> dict[str, list[list[float]]]:
    spec = SampleSpec(phast_search.SEARCH_LABELS, phast_search.SEARCH_SEEDS, steps, DEFAULT_GUIDANCE)
    recorder = RecordingPredictor(model)
    sample(model, spec, recorder)
    names = recorder.attention.names()
    scheduler = build_scheduler("ddim")
    scheduler.set_timesteps(steps)
    alphas = scheduler.alphas_cumprod[scheduler.timesteps]
    # DDIM in ComfyUI's (VE) sigmas, sqrt((1 - alpha_bar) / alpha_bar), ending at 0 as ComfyUI's sample_sigmas do
    sigmas = [float(((1 - a) / a).sqrt()) for a in alphas] + [0.0]
    return {
        "weights": sigma_step_weights(sigmas),
        "encoder": recorder.encoder.drift(steps),
        "map": recorder.attention.drift(steps, [n for n in names if n[0] == "map"]),
        "output": recorder.attention.drift(steps, [n for n in names if n[0] == "output"]),
    }


# FLOPs per kind of step ----------------------------------------------------------------------------------------------
@torch.no_grad()
def step_flops(model: BuiltinModel, rows: int) -> dict[str, int]:
    """Model FLOPs of one step of each kind, for a CFG batch of ``rows`` images."""
    x = torch.cat([initial_noise(range(rows))] * 2)
    labels = torch.arange(rows) % 10
    context = model.context(torch.cat([torch.full_like(labels, NULL_CLASS), labels]))
    t = torch.full((2 * rows,), 500)
    host = DiffusersUNetHost(model.unet)
    _, full = count_flops(lambda: model.unet(x, t, encoder_hidden_states=context).sample)
    features = host.encode(x, t, context)
    _, decoder = count_flops(lambda: host.decode(features, t, context))
    flops = {"full": full, "decoder": decoder}
    for mode in ("map", "output"):
        adapter = DiffusersAttentionReuse(model.unet, attention_config(mode), ReuseSchedule((1, 0))).install()
        try:
            adapter.set_step(0)
            model.unet(x, t, encoder_hidden_states=context)
            adapter.set_step(1)
            _, flops[f"reuse_{mode}"] = count_flops(lambda: model.unet(x, t, encoder_hidden_states=context).sample)
        finally:
            adapter.remove()
    return flops


# Runs -----------------------------------------------------------------------------------------------------------
class KeyRecordingEncoderPredictor(EncoderPropagationPredictor):
    def end(self):
        self.keys = tuple(sorted(self.engine.stats.full_steps))
        super().end()


def encoder_config(spec: KeyStepSpec) -> EncoderPropagationConfig:
    return EncoderPropagationConfig(key_steps=spec, parallel_decoding=False)


def evaluate(model, spec: SampleSpec, predictor, reference: torch.Tensor) -> tuple[float, float]:
    images, wall = wall_time(lambda: sample(model, spec, predictor))
    img, ref = to_unit_range(images), to_unit_range(reference)
    return statistics.fmean(psnr(img[i], ref[i], data_range=1.0) for i in range(len(img))), wall


def fewer_steps_curve(model, settings: CurveSettings, steps: int, reference, flops, log) -> list[Point]:
    points = []
    for k in range(max(2, steps // 4), steps + 1):
        spec = SampleSpec(settings.labels, settings.seeds, k)
        value, wall = evaluate(model, spec, StepPredictor(model), reference) if k < steps else (math.inf, 0.0)
        points.append(Point("fewer steps", "fewer", f"DDIM {k}", k / steps, value, wall))
        log(f"  DDIM {k}: {value:.2f} dB")
    return points


def equal_cost_psnr(curve: list[Point], cost: float) -> float | None:
    """The fewer-steps PSNR at ``cost`` (linear between step counts); None outside its finite part."""
    finite = [p for p in curve if math.isfinite(p.psnr)]
    for a, b in itertools.pairwise(finite):
        if a.flops_ratio <= cost <= b.flops_ratio:
            return a.psnr + (b.psnr - a.psnr) * (cost - a.flops_ratio) / (b.flops_ratio - a.flops_ratio)
    return None


def encoder_points(model, settings: CurveSettings, reference, drift, flops, log) -> list[Point]:
    n = settings.encoder_steps
    spec = SampleSpec(settings.labels, settings.seeds, n)
    runs: list[tuple[str, str, KeyStepSpec]] = [
        ("preset", "paper preset", KeyStepSpec("paper")),
        *[("preset", f"uniform k={k}", KeyStepSpec("uniform", k=k)) for k in (2, 3, 4)],
    ]
    for budget in settings.key_budgets:
        keys = optimal_compute_steps(drift["encoder"], budget, weights=drift["weights"]).steps
        runs.append(("calibrated", f"calibrated {budget} keys", KeyStepSpec("custom", custom=keys)))
    runs += [("adaptive", f"adaptive {t:g}", KeyStepSpec("adaptive", threshold=t)) for t in settings.thresholds]
    points = []
    for kind, label, keys in runs:
        predictor = KeyRecordingEncoderPredictor(model, encoder_config(keys))
        value, wall = evaluate(model, spec, predictor, reference)
        count = len(predictor.keys)
        cost = (count * flops["full"] + (n - count) * flops["decoder"]) / (n * flops["full"])
        points.append(Point("encoder", kind, label, cost, value, wall, {"key_steps": list(predictor.keys)}))
        log(f"  {label}: {count} keys, {cost:.3f}x FLOPs, {value:.2f} dB")
    return points


def attention_points(model, settings: CurveSettings, reference, drift, flops, phast, log) -> list[Point]:
    n = settings.attention_steps
    spec = SampleSpec(settings.labels, settings.seeds, n)
    runs: list[tuple[str, str, str, ReuseSchedule]] = []
    for r in settings.reuse_counts:
        runs.append(("preset", f"HURRY r={r}", "output", hurry(n, r)))
        bits = optimal_compute_steps(drift["output"], n - r, weights=drift["weights"]).steps
        schedule = ReuseSchedule(tuple(int(i in bits) for i in range(n)))
        runs.append(("calibrated", f"calibrated r={r}", "output", schedule))
    runs.append(("preset", "PHAST preset r=10", "output", phast_preset(n, 10)))
    for mode in ("map", "output"):
        bits = optimal_compute_steps(drift[mode], n - phast_search.SEARCH_REUSE, weights=drift["weights"]).steps
        calibrated = ReuseSchedule(tuple(int(i in bits) for i in range(n)))
        runs.append(("calibrated", f"calibrated r=10 ({mode})", mode, calibrated))
        if mode in phast and n == phast_search.SEARCH_STEPS:
            runs.append(("phast", f"PHAST searched r=10 ({mode})", mode, parse_bits(phast[mode]["schedule"])))
    points = []
    for kind, label, mode, schedule in runs:
        predictor = AttentionReusePredictor(model, attention_config(mode), schedule)
        value, wall = evaluate(model, spec, predictor, reference)
        reuse = schedule.reuse_count
        cost = ((n - reuse) * flops["full"] + reuse * flops[f"reuse_{mode}"]) / (n * flops["full"])
        points.append(Point("attention", kind, label, cost, value, wall, {"schedule": str(schedule), "mode": mode}))
        log(f"  {label}: {schedule}, {cost:.3f}x FLOPs, {value:.2f} dB")
    return points


def builtin_dit_status() -> str:
    """Why the built-in DiT has no curves here (or that it would load)."""
    try:
        from . import builtin_dit
    except ImportError as exc:
        return f"not available: {exc}"
    if not builtin_dit.WEIGHTS_PATH.is_file():
        return f"not measured: {builtin_dit.WEIGHTS_PATH.name} is missing (python -m reuse_bench.train_mnist_dit)"
    return "weights present, but its DiT curves are not implemented in this module yet"


def summarise(points: list[Point], fewer: dict[int, list[Point]], settings: CurveSettings) -> list[dict]:
    rows = []
    for method, steps in (("encoder", settings.encoder_steps), ("attention", settings.attention_steps)):
        for p in points:
            if p.method == method:
                base = equal_cost_psnr(fewer[steps], p.flops_ratio)
                p.gain_db = None if base is None else p.psnr - base
        for kind in ("preset", "calibrated", "adaptive", "phast"):
            scored = [p for p in points if p.method == method and p.kind == kind and p.gain_db is not None]
            if scored:
                best = max(scored, key=lambda p: p.gain_db)
                rows.append({"method": method, "kind": kind, "best": best.label, "gain_db": best.gain_db,
                             "psnr": best.psnr, "flops_ratio": best.flops_ratio})  # fmt: skip
    return rows


def plot(points: list[Point], fewer: dict[int, list[Point]], settings: CurveSettings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    markers = {"preset": "s", "calibrated": "o", "adaptive": "^", "phast": "*"}
    methods = (("encoder", settings.encoder_steps), ("attention", settings.attention_steps))
    for row, (method, steps) in enumerate(methods):
        curve = [p for p in fewer[steps] if math.isfinite(p.psnr)]
        for col, (axis, key) in enumerate((("model FLOPs / reference", "flops_ratio"), ("wall s", "wall_s"))):
            ax = axes[row][col]
            ax.plot([getattr(p, key) for p in curve], [p.psnr for p in curve], "k-", label="fewer DDIM steps")
            for kind, marker in markers.items():
                chosen = [p for p in points if p.method == method and p.kind == kind]
                if chosen:
                    ax.scatter([getattr(p, key) for p in chosen], [p.psnr for p in chosen], marker=marker, label=kind)
            ax.set_xlabel(axis)
            ax.set_ylabel("PSNR dB vs full compute")
            ax.set_title(f"{method} ({steps}-step reference)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 images, 20-step references, fewer settings (~2 min)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = CurveSettings.for_mode(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(text, flush=True)

    model = load_builtin_model()
    flops = step_flops(model, len(settings.labels))
    log(f"FLOPs per step: {flops}")
    phast = phast_search.load_stored()
    fewer: dict[int, list[Point]] = {}
    references: dict[int, torch.Tensor] = {}
    drifts: dict[int, dict] = {}
    for steps in sorted({settings.encoder_steps, settings.attention_steps}):
        references[steps] = sample(model, SampleSpec(settings.labels, settings.seeds, steps))
        log(f"fewer steps against DDIM {steps}:")
        fewer[steps] = fewer_steps_curve(model, settings, steps, references[steps], flops, log)
        drifts[steps] = record_drift(model, steps)
    log("Encoder Feature Propagation:")
    points = encoder_points(
        model, settings, references[settings.encoder_steps], drifts[settings.encoder_steps], flops, log
    )
    log("Attention Map Reuse:")
    points += attention_points(
        model, settings, references[settings.attention_steps], drifts[settings.attention_steps], flops, phast, log
    )
    table = summarise(points, fewer, settings)
    vs_phast = []
    for mode in ("map", "output"):
        calibrated = next((p for p in points if p.label == f"calibrated r=10 ({mode})"), None)
        searched = next((p for p in points if p.label == f"PHAST searched r=10 ({mode})"), None)
        if calibrated and searched:
            vs_phast.append({
                "mode": mode, "calibrated_psnr": calibrated.psnr, "phast_psnr": searched.psnr,
                "calibrated_schedule": calibrated.detail["schedule"], "phast_schedule": searched.detail["schedule"],
                "calibrated_runs": 1, "phast_runs": phast[mode]["evaluations"],
            })  # fmt: skip
    result = {
        "settings": asdict(settings),
        "step_flops": flops,
        "points": [asdict(p) for p in points],
        "fewer_steps": {str(k): [asdict(p) for p in v] for k, v in fewer.items()},
        "best_gain": table,
        "vs_phast": vs_phast,
        "builtin_dit": builtin_dit_status(),
    }
    name = "calibration_curves_quick" if args.quick else "calibration_curves"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1, default=float))
    plot(points, fewer, settings, args.out / f"{name}.png")
    log("\nbest PSNR gain over fewer DDIM steps at equal model FLOPs:")
    log("| method | kind | best setting | FLOPs | PSNR dB | gain dB |")
    log("|---|---|---|---|---|---|")
    for row in table:
        log(f"| {row['method']} | {row['kind']} | {row['best']} | {row['flops_ratio']:.3f}x | {row['psnr']:.2f} | "
            f"{row['gain_db']:+.2f} |")  # fmt: skip
    for row in vs_phast:
        gap = row["calibrated_psnr"] - row["phast_psnr"]
        log(f"calibrated vs PHAST ({row['mode']}): {row['calibrated_psnr']:.2f} dB ({row['calibrated_runs']} run) vs "
            f"{row['phast_psnr']:.2f} dB ({row['phast_runs']} runs): {gap:+.2f} dB")  # fmt: skip
    log(f"built-in DiT: {result['builtin_dit']}")
    return result


if __name__ == "__main__":
    main()
