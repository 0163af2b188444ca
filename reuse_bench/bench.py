"""The bench: every method on the built-in models, side by side (``python -m reuse_bench``).

Two models, each with its own rows: the MNIST U-Net (DDIM; references DDIM 50 and DDIM 20) and the MNIST DiT
(``builtin_dit``: Euler flow; reference Euler 24; rows named ``DiT: ...``). For a fixed set of seeds and classes
it samples the full-compute references and each method at the same step count, then reports per method: wall-time
ratio to its reference (medians of interleaved repeats in this process), measured model FLOPs relative to the
reference and what the method skipped, PSNR/SSIM of the final images against the reference of the same model and
seed (mean and worst), the digit classifier's accuracy on the requested classes, peak tensor memory of a run, and
the model's plain sampler at the best of the step counts that fit in the method's wall time, with that fewer-step
run's PSNR against the same reference.
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

from reuse_core.calibration import ATTENTION_OUTPUT, fit_compute_steps, sigma_step_weights
from reuse_core.key_steps import KeyStepSpec
from reuse_core.metrics import psnr, ssim
from reuse_core.schedules import hurry, parse_bits, phast_preset

from . import methods as M
from . import methods_dit as MD
from . import phast_search
from .builtin_dit import DEFAULT_GUIDANCE as DIT_GUIDANCE
from .builtin_dit import DEFAULT_STEPS as DIT_STEPS
from .builtin_dit import BuiltinDiT, flow_sigmas, load_builtin_dit
from .builtin_model import BuiltinModel, load_builtin_model
from .digit_classifier import DigitClassifier, held_out_accuracy, load_classifier
from .measure import count_flops, peak_tensor_bytes, wall_time
from .sampling import DEFAULT_GUIDANCE, SampleSpec, ddim_sigmas, sample, to_unit_range
from .sampling_dit import DiTSampleSpec, sample_dit

ATTENTION_STEPS, ATTENTION_REUSE = 20, 10
ENCODER_STEPS = 50
DIT_ATTENTION_REUSE = DIT_STEPS // 2  # HURRY with half the steps reused, as the U-Net rows (10 of 20)
# The forecast rows' order: linear (quadratic measured below it on both models, docs/benchmarks.md#forecasting).
FORECAST = 1
# Light attention reuse (a few late steps, where the attention output changes least) for the forecast rows.
LIGHT_ATTENTION_REUSE = 4


@dataclass(frozen=True)
class BenchSettings:
    quick: bool = False
    labels: tuple[int, ...] = tuple(range(10))
    seeds: tuple[int, ...] = tuple(range(10))
    repeats: int = 5
    guidance: float = DEFAULT_GUIDANCE
    dit_guidance: float = DIT_GUIDANCE
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


def calibrated_schedules(unet: BuiltinModel, dit: BuiltinDiT, settings: BenchSettings) -> dict[str, dict]:
    """Per model, what Reuse Calibrate would pick from one full-compute run on the PHAST search's seeds (never the
    bench's): as many key steps as the paper preset, and an output-mode schedule reusing as many steps as HURRY; for
    ``forecast = reuse`` (fitted to the drift) and ``linear`` (fitted to a linear forecast's error)."""
    search = (phast_search.SEARCH_LABELS, phast_search.SEARCH_SEEDS)

    def fitted(recorder, sigmas: list[float], key_count: int, attention_steps: int, reuse: int) -> dict:
        steps = len(sigmas) - 1
        weights = sigma_step_weights(sigmas)
        encoder = recorder.encoder.trajectory(steps)
        attention = recorder.attention.trajectory(steps, recorder.attention.names(ATTENTION_OUTPUT))
        out = {}
        for name, order in (("reuse", 0), ("linear", FORECAST)):
            keys = fit_compute_steps(encoder, key_count, order, weights=weights).steps
            out[name] = {"key_steps": list(keys)}
            if steps == attention_steps:
                out[name]["schedule"] = str(fit_compute_steps(attention, steps - reuse, order, weights=weights)
                                            .schedule(steps))  # fmt: skip
        return out

    def unet_fit(steps: int) -> dict:
        recorder = M.RecordingPredictor(unet)
        sample(unet, SampleSpec(*search, steps, settings.guidance), recorder)
        return fitted(recorder, ddim_sigmas(steps), len(KeyStepSpec("paper").key_steps(steps)), ATTENTION_STEPS,
                      ATTENTION_REUSE)  # fmt: skip

    recorder = MD.RecordingDiTPredictor(dit)
    sample_dit(dit, DiTSampleSpec(*search, DIT_STEPS, settings.dit_guidance), recorder)
    dit_fit = fitted(recorder, flow_sigmas(DIT_STEPS).tolist(), len(KeyStepSpec("paper").key_steps(DIT_STEPS)),
                     DIT_STEPS, DIT_ATTENTION_REUSE)  # fmt: skip
    unet_keys, unet_schedule = unet_fit(ENCODER_STEPS), unet_fit(ATTENTION_STEPS)
    return {
        "U-Net": {
            name: {"key_steps": unet_keys[name]["key_steps"], "schedule": unet_schedule[name]["schedule"]}
            for name in ("reuse", "linear")
        },
        "DiT": dit_fit,
    }


def calibrated_rows(
    method_module, calibrated: dict, encoder_steps: int, attention_steps: int, reuse: int, **encoder_settings
) -> list:
    """Reuse rows on the schedules fitted for reuse, forecast rows on those fitted for the forecast's error (the
    U-Net's forecast rows with ``encoder_settings``: no noise injection, as its other forecast rows)."""
    rows = []
    for name, order, settings in (("reuse", 0, {}), ("linear", FORECAST, encoder_settings)):
        keys, schedule = calibrated[name]["key_steps"], parse_bits(calibrated[name]["schedule"])
        rows += [
            method_module.encoder_method(
                f"Encoder propagation calibrated ({len(keys)} keys)", encoder_steps, KeyStepSpec("custom", custom=keys),
                parallel=True, forecast=order, **settings,
            ),
            method_module.attention_method(
                f"Attention reuse calibrated r={reuse}", attention_steps, schedule, "output", forecast=order
            ),
        ]  # fmt: skip
    return rows


def forecast_rows(
    method_module, encoder_presets, encoder_steps: int, attention_schedules, attention_steps: int, **encoder_settings
):
    """The forecast twin of each reuse row: the same key steps or schedule, ``forecast = linear``. ``encoder_settings``
    (the U-Net's ``injection=False``) give the encoder rows a reuse twin with those settings too."""
    forecasts = (0, FORECAST) if encoder_settings else (FORECAST,)
    rows = [
        method_module.encoder_method(name, encoder_steps, keys, parallel=True, forecast=f, **encoder_settings)
        for name, keys in encoder_presets
        if keys.preset != "one_pass"  # one key step: nothing to forecast from
        for f in forecasts
    ]
    rows += [
        method_module.attention_method(name, attention_steps, schedule, "output", forecast=FORECAST)
        for name, schedule in attention_schedules
    ]
    return rows


def light_attention_rows(method_module, steps: int) -> list:
    """Attention reuse at a few steps (the PHAST preset's choice of them), reuse and forecast: light reuse is where
    reuse can beat running fewer steps."""
    schedule = phast_preset(steps, LIGHT_ATTENTION_REUSE)
    name = f"Attention reuse PHAST preset r={LIGHT_ATTENTION_REUSE}"
    return [method_module.attention_method(name, steps, schedule, "output", forecast=f) for f in (0, FORECAST)]


def build_methods(phast: dict[str, dict], calibrated: dict, quick: bool = False) -> list[M.Method]:
    """Every U-Net row of the full run; ``quick`` keeps one row per setting that the README table needs."""
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
    rows += calibrated_rows(M, calibrated, e_steps, a_steps, ATTENTION_REUSE, injection=False)
    attention_schedules = [
        (f"Attention reuse HURRY r={ATTENTION_REUSE}", hurry(a_steps, ATTENTION_REUSE)),
        ("Attention reuse PHAST searched", parse_bits(phast["output"]["schedule"])),
    ]
    # Prior noise injection offsets reuse's loss of detail; a forecast loses less and the noise is then an error of its
    # own (measured: uniform k=2 linear 29.5 dB with it, 38.2 without), so the U-Net's forecast rows run without it.
    rows += forecast_rows(M, presets, e_steps, attention_schedules, a_steps, injection=False)
    rows += light_attention_rows(M, a_steps)
    rows.append(M.combined_method(a_steps, KeyStepSpec("paper"), parse_bits(phast["output"]["schedule"]), "output"))
    if not quick:
        rows.append(M.combined_method(a_steps, KeyStepSpec("paper"), parse_bits(phast["map"]["schedule"]), "map"))
    peers = (
        M.peer_methods(a_steps)[:1] + M.peer_methods(e_steps)[1:]
        if quick
        else [*M.peer_methods(a_steps), *M.peer_methods(e_steps)]
    )
    return rows + peers


def build_dit_methods(calibrated: dict, quick: bool = False) -> list[M.Method]:
    """The DiT rows (one reference step count); ``quick`` keeps the rows the README table needs."""
    steps = DIT_STEPS
    rows = [MD.reference(steps)]
    presets = [("Encoder propagation paper preset", KeyStepSpec("paper"))]
    presets += [(f"Encoder propagation uniform k={k}", KeyStepSpec("uniform", k=k)) for k in (2, 3, 4)]
    for name, keys in presets:
        rows.append(MD.encoder_method(name, steps, keys, parallel=True))
    if not quick:
        rows.append(MD.encoder_method("Encoder propagation paper preset", steps, KeyStepSpec("paper"), parallel=False))
    for mode in ("output",) if quick else ("map", "output"):
        schedule = hurry(steps, DIT_ATTENTION_REUSE)
        rows.append(MD.attention_method(f"Attention reuse HURRY r={DIT_ATTENTION_REUSE}", steps, schedule, mode))
    rows += calibrated_rows(MD, calibrated, steps, steps, DIT_ATTENTION_REUSE)
    attention_schedules = [(f"Attention reuse HURRY r={DIT_ATTENTION_REUSE}", hurry(steps, DIT_ATTENTION_REUSE))]
    rows += forecast_rows(MD, presets, steps, attention_schedules, steps)
    rows += light_attention_rows(MD, steps)
    return rows + MD.peer_methods(steps, quick)


@dataclass
class Subject:
    """One model of the bench: its rows and how to sample it (with a method's predictor, or plainly)."""

    label: str
    model: object
    rows: list[Row]
    spec: Callable[[int], object]  # steps -> sample spec over the bench's labels and seeds
    one_image_spec: Callable[[int], object]
    sample: Callable[[object, object], torch.Tensor]  # (spec, predictor or None) -> images
    sampler: str
    # per reference step count: the plain sampler's mean PSNR at each fewer step count measured (filled by _measure)
    fewer_steps: dict[int, dict[int, float]] = field(default_factory=dict)

    def run(self, spec, method: M.Method):
        predictor = method.make(self.model)
        return self.sample(spec, predictor), predictor

    @property
    def parameters(self) -> int:
        net = getattr(self.model, "unet", None) or self.model.transformer
        return sum(p.numel() for p in net.parameters())


def _subjects(
    settings: BenchSettings, phast: dict[str, dict], calibrated: dict[str, dict], unet: BuiltinModel, dit: BuiltinDiT
) -> list[Subject]:
    labels, seeds = settings.labels, settings.seeds
    return [
        Subject(
            "U-Net",
            unet,
            [Row(m) for m in build_methods(phast, calibrated["U-Net"], settings.quick)],
            lambda n: SampleSpec(labels, seeds, n, settings.guidance),
            lambda n: SampleSpec(labels[:1], seeds[:1], n, settings.guidance),
            lambda spec, predictor: sample(unet, spec, predictor),
            "DDIM (eta 0)",
        ),
        Subject(
            "DiT",
            dit,
            [Row(m) for m in build_dit_methods(calibrated["DiT"], settings.quick)],
            lambda n: DiTSampleSpec(labels, seeds, n, settings.dit_guidance),
            lambda n: DiTSampleSpec(labels[:1], seeds[:1], n, settings.dit_guidance),
            lambda spec, predictor: sample_dit(dit, spec, predictor),
            "Euler (rectified flow)",
        ),
    ]


def _stats(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.inf), min(values)


def _measure(subject: Subject, settings: BenchSettings, classifier: DigitClassifier, bar) -> None:
    rows = subject.rows
    specs = {steps: subject.spec(steps) for steps in {r.method.steps for r in rows}}
    labels = torch.tensor(settings.labels)
    # Warm-up (first calls pay for kernel selection and allocation), then interleaved timed repeats.
    subject.sample(subject.one_image_spec(3), None)
    for _ in range(settings.repeats):
        for row in rows:
            (images, predictor), seconds = wall_time(lambda row=row: subject.run(specs[row.method.steps], row.method))
            row.times.append(seconds)
            row.images, row.note = images, getattr(predictor, "note", "")
            if bar:
                bar.update(1)
    # One instrumented run per method on the first image only (dispatch modes slow a run down, so it is never
    # timed; FLOP ratios do not depend on the batch, except for a batch-dependent method's, which are those of
    # this one-image run): model FLOPs and peak tensor memory.
    first_reference = {r.method.steps: r.images[0] for r in rows if r.method.family == "reference"}
    for row in rows:
        spec = subject.one_image_spec(row.method.steps)
        ((images, predictor), row.peak_bytes), row.flops = count_flops(
            lambda row=row, spec=spec: peak_tensor_bytes(lambda: subject.run(spec, row.method))
        )
        row.cache_bytes = getattr(predictor, "cache_bytes", 0)
        # The same seed must give the same image in every run of a method (batch size aside): a difference
        # means a method left state behind in the shared model, and every later row would be wrong. A
        # batch-dependent method may differ alone, so there the plain model must still give its reference image.
        if row.method.batch_dependent:
            images, expected = subject.sample(spec, None), first_reference[row.method.steps]
        else:
            expected = row.images[0]
        drift = (images[0] - expected).abs().max().item()
        if drift > 1e-2:
            raise RuntimeError(
                f"{row.method.name}: seed {settings.seeds[0]} gave a different image in a second run"
                f"{' of the plain model after it' if row.method.batch_dependent else ''} (max difference "
                f"{drift:.3g}); state leaked between runs"
            )
        if bar:
            bar.update(1)

    references = {r.method.steps: r for r in rows if r.method.family == "reference"}
    fewer_images: dict[int, torch.Tensor] = {}  # plain sampler, per step count
    fewer_psnr: dict[tuple[int, int], float] = {}  # per (step count, reference step count)

    def fewer_steps_psnr(n: int, reference_steps: int) -> float:
        if (n, reference_steps) not in fewer_psnr:
            if n not in fewer_images:
                fewer_images[n] = to_unit_range(subject.sample(subject.spec(n), None))
            pairs = zip(fewer_images[n], to_unit_range(references[reference_steps].images), strict=True)
            fewer_psnr[n, reference_steps] = _stats([psnr(f, r, data_range=1.0) for f, r in pairs])[0]
        return fewer_psnr[n, reference_steps]

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
            "model": subject.label,
            "sampler": subject.sampler,
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
            # The plain alternative: the model's own sampler with at most as many steps as fit in the method's time,
            # at the step count that comes closest to the reference: its PSNR is not monotone in the step count (DDIM
            # 17 of 20 is 1.2 dB below DDIM 16 on this model), and nobody would pay for a worse, slower count. A method
            # that is not faster than the reference has no such alternative (n >= steps), so nothing is sampled.
            n = max(1, round(row.method.steps * ratio))
            result["equal_time_ddim_steps"] = n
            result["equal_time_best_steps"] = None
            result["equal_time_ddim_psnr_mean"] = None
            if n < row.method.steps:
                by_steps = {k: fewer_steps_psnr(k, row.method.steps) for k in range(1, n + 1)}
                best = max(by_steps, key=by_steps.get)
                result["equal_time_best_steps"], result["equal_time_ddim_psnr_mean"] = best, by_steps[best]
        row.result = result
    # The fewer-steps curve the plot draws each method against: every step count sampled above, per reference.
    for (n, reference_steps), value in sorted(fewer_psnr.items()):
        subject.fewer_steps.setdefault(reference_steps, {})[n] = value


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print, progress_factory=None) -> dict:
    classifier: DigitClassifier = load_classifier()
    unet = load_builtin_model()
    dit = load_builtin_dit()
    phast = phast_schedules(unet, settings, log)
    calibrated = calibrated_schedules(unet, dit, settings)
    log(f"calibrated (one recording run per model and step count): {calibrated}")
    subjects = _subjects(settings, phast, calibrated, unet, dit)
    total = sum((settings.repeats + 1) * len(s.rows) for s in subjects)
    bar = progress_factory(total) if progress_factory else None
    for subject in subjects:
        _measure(subject, settings, classifier, bar)
    if bar:
        bar.close()
    rows = [r for s in subjects for r in s.rows]

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
            "dit_guidance": settings.dit_guidance,
            "dit_sampler": "Euler (rectified flow, linear sigmas 1 -> 0)",
            "dit_steps": DIT_STEPS,
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
            "parameters": subjects[0].parameters,
            "training": subjects[0].model.metadata.get("training", {}).get("command"),
        },
        "models": {
            s.label: {"parameters": s.parameters, "training": s.model.metadata.get("training", {}).get("command")}
            for s in subjects
        },
        "classifier_held_out_accuracy": held_out_accuracy(),
        "phast": phast,
        "calibrated": calibrated,
        "rows": [r.result for r in rows],
        "fewer_steps": {s.label: s.fewer_steps for s in subjects},
        "_images": {r.result["method"] + f" [{r.method.steps}]": r.images for r in rows},
    }
