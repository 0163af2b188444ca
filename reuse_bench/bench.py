"""The bench: every method on the built-in model, side by side (``python -m reuse_bench``).

For a fixed set of seeds and classes it samples the full-compute references (DDIM 50 and DDIM 20) and each
method at the same step count, then reports per method: wall-time ratio to its reference (medians of
interleaved repeats in this process), measured U-Net FLOPs relative to the reference and what the method
skipped, PSNR/SSIM of the final images against the reference of the same seed (mean and worst), the digit
classifier's accuracy on the requested classes, peak tensor memory of a run, and the DDIM step count that
takes the same wall time as the method, with that fewer-step run's PSNR against the same reference.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from reuse_core.key_steps import KeyStepSpec
from reuse_core.metrics import psnr, ssim
from reuse_core.schedules import hurry, parse_bits, phast_preset

from . import methods as M
from . import phast_search
from .builtin_model import BuiltinModel, load_builtin_model
from .digit_classifier import DigitClassifier, held_out_accuracy, load_classifier
from .measure import count_flops, peak_tensor_bytes, wall_time
from .sampling import DEFAULT_GUIDANCE, SampleSpec, StepPredictor, sample, to_unit_range

ATTENTION_STEPS, ATTENTION_REUSE = 20, 10
ENCODER_STEPS = 50


@dataclass(frozen=True)
class BenchSettings:
    quick: bool = False
    labels: tuple[int, ...] = tuple(range(10))
    seeds: tuple[int, ...] = tuple(range(10))
    repeats: int = 5
    guidance: float = DEFAULT_GUIDANCE
    search_phast: bool = True  # full run: search here; quick: use the stored search result

    @classmethod
    def for_mode(cls, quick: bool, repeats: int | None = None, search_phast: bool = True) -> BenchSettings:
        if quick:
            return cls(quick=True, labels=(0, 3, 7, 9), seeds=(0, 1, 2, 3), repeats=repeats or 1, search_phast=False)
        return cls(repeats=repeats or 5, search_phast=search_phast)

    def __post_init__(self):
        if self.repeats < 1:
            raise ValueError(f"repeats: must be >= 1, got {self.repeats}")
        if len(self.labels) != len(self.seeds):
            raise ValueError("labels and seeds: need one seed per label")


@dataclass
class Row:
    method: M.Method
    times: list[float] = field(default_factory=list)
    images: torch.Tensor | None = None
    note: str = ""
    flops: int = 0
    peak_bytes: int = 0
    cache_bytes: int = 0
    result: dict = field(default_factory=dict)


def phast_schedules(model: BuiltinModel, settings: BenchSettings, log: Callable[[str], None]) -> dict[str, dict]:
    """PHAST searched on this model per mode: searched now (full run) or read from the stored search."""
    stored = phast_search.load_stored()
    found = {}
    for mode in ("map", "output"):
        if settings.search_phast:
            log(f"searching PHAST ({mode} mode) on seeds {phast_search.SEARCH_SEEDS} ...")
            found[mode] = phast_search.search(model, mode)
            found[mode]["source"] = "searched in this run"
            if mode in stored and stored[mode]["schedule"] != found[mode]["schedule"]:
                found[mode]["stored_schedule"] = stored[mode]["schedule"]
        elif mode in stored:
            found[mode] = dict(stored[mode], source=f"stored search ({phast_search.STORE_PATH.name})")
        else:
            raise FileNotFoundError(
                f"no stored PHAST search at {phast_search.STORE_PATH}; run "
                "`python -m reuse_bench.phast_search` or the full bench"
            )
    return found


def build_methods(phast: dict[str, dict], quick: bool = False) -> list[M.Method]:
    """Every row of the full run; ``quick`` keeps one row per setting that the README table needs."""
    a_steps, e_steps = ATTENTION_STEPS, ENCODER_STEPS
    rows = [M.reference(e_steps), M.reference(a_steps)]
    for mode in ("map", "output"):
        rows.append(
            M.attention_method(
                f"Attention reuse HURRY r={ATTENTION_REUSE}", a_steps, hurry(a_steps, ATTENTION_REUSE), mode
            )
        )
        if not quick:
            rows.append(
                M.attention_method(
                    "Attention reuse PHAST paper preset", a_steps, phast_preset(a_steps, ATTENTION_REUSE), mode
                )
            )
        rows.append(
            M.attention_method("Attention reuse PHAST searched", a_steps, parse_bits(phast[mode]["schedule"]), mode)
        )
    presets = [("Encoder propagation paper preset", KeyStepSpec("paper"))]
    presets += [(f"Encoder propagation uniform k={k}", KeyStepSpec("uniform", k=k)) for k in (2, 3, 4)]
    presets += [("Encoder propagation one_pass", KeyStepSpec("one_pass"))]
    for name, keys in presets:
        for parallel in (True, False):
            if parallel or not quick or keys.preset == "paper":
                rows.append(M.encoder_method(name, e_steps, keys, parallel))
    if not quick:
        rows.append(
            M.encoder_method("Encoder propagation paper preset", e_steps, KeyStepSpec("paper"), True, injection=False)
        )
        rows.append(M.encoder_method("Encoder propagation paper preset (scaled)", a_steps, KeyStepSpec("paper"), True))
    rows.append(M.combined_method(a_steps, KeyStepSpec("paper"), parse_bits(phast["output"]["schedule"]), "output"))
    if not quick:
        rows.append(M.combined_method(a_steps, KeyStepSpec("paper"), parse_bits(phast["map"]["schedule"]), "map"))
    peers = (
        M.peer_methods(a_steps)[:1] + M.peer_methods(e_steps)[1:]
        if quick
        else [*M.peer_methods(a_steps), *M.peer_methods(e_steps)]
    )
    return rows + peers


def _run(model: BuiltinModel, spec: SampleSpec, method: M.Method) -> tuple[torch.Tensor, StepPredictor]:
    predictor = method.make(model)
    return sample(model, spec, predictor), predictor


def _stats(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.inf), min(values)


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print, progress_factory=None) -> dict:
    model = load_builtin_model()
    classifier: DigitClassifier = load_classifier()
    phast = phast_schedules(model, settings, log)
    rows = [Row(m) for m in build_methods(phast, settings.quick)]
    spec_of = {
        steps: SampleSpec(settings.labels, settings.seeds, steps, settings.guidance)
        for steps in {r.method.steps for r in rows}
    }
    labels = torch.tensor(settings.labels)

    # Warm-up (first calls pay for kernel selection and allocation), then interleaved timed repeats.
    sample(model, SampleSpec(settings.labels[:1], settings.seeds[:1], 3, settings.guidance))
    total = settings.repeats * len(rows) + len(rows)
    bar = progress_factory(total) if progress_factory else None
    for _ in range(settings.repeats):
        for row in rows:
            (images, predictor), seconds = wall_time(lambda row=row: _run(model, spec_of[row.method.steps], row.method))
            row.times.append(seconds)
            row.images, row.note = images, getattr(predictor, "note", "")
            if bar:
                bar.update(1)
    # One instrumented run per method on the first image only (dispatch modes slow a run down, so it is never
    # timed; FLOP ratios do not depend on the batch): U-Net FLOPs and peak tensor memory.
    for row in rows:
        spec = SampleSpec(settings.labels[:1], settings.seeds[:1], row.method.steps, settings.guidance)
        ((images, predictor), row.peak_bytes), row.flops = count_flops(
            lambda row=row, spec=spec: peak_tensor_bytes(lambda: _run(model, spec, row.method))
        )
        row.cache_bytes = getattr(predictor, "cache_bytes", 0)
        # The same seed must give the same image in every run of a method (batch size aside): a difference
        # means a method left state behind in the shared U-Net, and every later row would be wrong.
        drift = (images[0] - row.images[0]).abs().max().item()
        if drift > 1e-2:
            raise RuntimeError(
                f"{row.method.name}: seed {settings.seeds[0]} gave a different image in a second "
                f"run (max difference {drift:.3g}); state leaked between runs"
            )
        if bar:
            bar.update(1)
    if bar:
        bar.close()

    references = {r.method.steps: r for r in rows if r.method.family == "reference"}
    fewer_step_cache: dict[int, torch.Tensor] = {}

    def fewer_steps(n: int) -> torch.Tensor:
        if n not in fewer_step_cache:
            fewer_step_cache[n] = sample(model, SampleSpec(settings.labels, settings.seeds, n, settings.guidance))
        return fewer_step_cache[n]

    for row in rows:
        ref = references[row.method.steps]
        ref_time, ref_img = statistics.median(ref.times), to_unit_range(ref.images)
        img = to_unit_range(row.images)
        psnrs = [psnr(img[i], ref_img[i], data_range=1.0) for i in range(len(img))]
        ssims = [ssim(img[i : i + 1], ref_img[i : i + 1], data_range=1.0) for i in range(len(img))]
        median = statistics.median(row.times)
        ratio = median / ref_time
        result = {
            "method": row.method.name,
            "family": row.method.family,
            "steps": row.method.steps,
            "settings": row.method.settings,
            "median_s": median,
            "times_s": row.times,
            "time_ratio": ratio,
            "flops": row.flops,
            "flops_ratio": row.flops / ref.flops if ref.flops else None,
            "work_skipped": row.note,
            "peak_tensor_bytes": row.peak_bytes,
            "cache_bytes": row.cache_bytes,
            "psnr": psnrs,
            "ssim": ssims,
            "classifier_accuracy": float((classifier.predict(row.images) == labels).float().mean()),
        }
        result["psnr_mean"], result["psnr_worst"] = _stats(psnrs)
        result["ssim_mean"], result["ssim_worst"] = statistics.fmean(ssims), min(ssims)
        if row.method.family != "reference":
            # The plain alternative: DDIM with as many steps as fit in the method's time. A method that is not
            # faster than the reference has no such alternative (n >= steps), so nothing is sampled for it.
            n = max(1, round(row.method.steps * ratio))
            result["equal_time_ddim_steps"] = n
            result["equal_time_ddim_psnr_mean"] = None
            if n < row.method.steps:
                fewer = to_unit_range(fewer_steps(n))
                fewer_psnr = [psnr(fewer[i], ref_img[i], data_range=1.0) for i in range(len(fewer))]
                result["equal_time_ddim_psnr_mean"] = _stats(fewer_psnr)[0]
        row.result = result

    return {
        "settings": {
            "quick": settings.quick,
            "labels": list(settings.labels),
            "seeds": list(settings.seeds),
            "repeats": settings.repeats,
            "guidance": settings.guidance,
            "sampler": "DDIM (eta 0)",
            "attention_steps": ATTENTION_STEPS,
            "attention_reuse": ATTENTION_REUSE,
            "encoder_steps": ENCODER_STEPS,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "parameters": sum(p.numel() for p in model.unet.parameters()),
            "training": model.metadata.get("training", {}).get("command"),
        },
        "classifier_held_out_accuracy": held_out_accuracy(),
        "phast": phast,
        "rows": [r.result for r in rows],
        "_images": {r.result["method"] + f" [{r.method.steps}]": r.images for r in rows},
    }
