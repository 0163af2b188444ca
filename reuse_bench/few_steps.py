"""Few-step runs (distilled 4-8 step models): every preset of both nodes on the built-in DiT at 4, 6 and 8 Euler steps,
against the plain sampler with one or two fewer steps. ``python -m reuse_bench.few_steps`` prints a Markdown table
(``--steps 4,6,8``, ``--images 10``; about 5 minutes on 2 shared CPU cores).

Per step count N: the full-compute Euler N run is the reference; each row is sampled with the node's preset resolved
for N as the node resolves it (``KeyStepSpec.from_inputs`` / ``ScheduleSpec.resolve`` with the node's default inputs,
changed only where the row says), and scored by PSNR of the final images (mean and worst of the images) against the
reference. The plain rows are Euler N-1 and N-2 against the same Euler N reference. Cost: model FLOPs of a one-image
run relative to the reference (``measure.count_flops``), and what the method skipped. The last column compares each
row with the best plain Euler run that costs no more FLOPs (k of N steps cost k/N): positive means the method beat
simply running fewer steps.

Encoder Feature Propagation runs with the node's encoder split (``encoder_fraction`` 0.643: 4 of the DiT's 6 blocks),
Attention Map Reuse in output mode (the README's choice for DiTs); a few rows add a linear forecast
(``reuse_core.forecast``). The node's default attention setting, ``reuse_steps``
10, stops runs of 10 steps or fewer with an error naming ``reuse_steps``; its row says so instead of scoring.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from reuse_core.key_steps import ADAPTIVE_DEFAULT_THRESHOLD, KeyStepSpec
from reuse_core.metrics import psnr
from reuse_core.schedules import ScheduleSpec

from . import methods_dit as MD
from .builtin_dit import DEFAULT_GUIDANCE, BuiltinDiT, load_builtin_dit
from .measure import count_flops
from .sampling import to_unit_range
from .sampling_dit import DiTSampleSpec, sample_dit

STEP_COUNTS = (4, 6, 8)
# The nodes' defaults (nodes/encoder_node.py, nodes/attention_node.py).
CUSTOM_KEY_STEPS = "0,1,2,3,5,10,15,25,35"
CUSTOM = "11111111010001000000"
ADAPTIVE = ADAPTIVE_DEFAULT_THRESHOLD
ATTENTION_MODE = "output"


@dataclass(frozen=True)
class Row:
    """One row for one step count: ``method`` is None for a plain run of ``plain_steps`` steps, and for a setting the
    node refuses at this step count (``refused`` says why)."""

    node: str
    setting: str
    plan: str = ""
    method: MD.Method | None = None
    plain_steps: int = 0
    refused: str = ""


def encoder_rows(steps: int, forecast: bool) -> list[Row]:
    settings = [
        ("paper", KeyStepSpec("paper"), 0),
        ("uniform k=2", KeyStepSpec("uniform", k=2), 0),
        ("uniform k=4 (node default k)", KeyStepSpec("uniform", k=4), 0),
        ("one_pass", KeyStepSpec("one_pass"), 0),
        (f"custom {CUSTOM_KEY_STEPS} (node default list)", KeyStepSpec.from_inputs("custom", 4, CUSTOM_KEY_STEPS), 0),
        (f"adaptive threshold {ADAPTIVE_DEFAULT_THRESHOLD:g}", KeyStepSpec("adaptive", threshold=ADAPTIVE), 0),
    ]
    if forecast:
        settings += [
            ("paper, forecast linear", KeyStepSpec("paper"), 1),
            ("uniform k=2, forecast linear", KeyStepSpec("uniform", k=2), 1),
        ]
    rows = []
    for name, spec, order in settings:
        plan = "decided while sampling" if spec.adaptive else ",".join(map(str, spec.key_steps(steps)))
        method = MD.encoder_method(name, steps, spec, parallel=True, forecast=order)
        rows.append(Row("Encoder Feature Propagation", name, plan, method))
    return rows


def attention_rows(steps: int, forecast: bool) -> list[Row]:
    settings = [
        ("phast, reuse_steps 10 (node default)", ScheduleSpec("phast", reuse_steps=10), 0),
        ("phast, reuse_fraction 0.5", ScheduleSpec("phast", reuse_fraction=0.5), 0),
        ("phast, reuse_fraction 0.25", ScheduleSpec("phast", reuse_fraction=0.25), 0),
        ("hurry, reuse_fraction 0.5", ScheduleSpec("hurry", reuse_fraction=0.5), 0),
        ("custom 20-step schedule (node default), resampled", ScheduleSpec("custom", custom_schedule=CUSTOM), 0),
    ]
    if forecast:
        settings.append(("phast, reuse_fraction 0.5, forecast linear", ScheduleSpec("phast", reuse_fraction=0.5), 1))
    rows = []
    for name, spec, order in settings:
        try:
            schedule = spec.resolve(steps).schedule
        except ValueError as error:
            rows.append(Row("Attention Map Reuse", name, refused=str(error)))
            continue
        method = MD.attention_method(name, steps, schedule, ATTENTION_MODE, forecast=order)
        rows.append(Row("Attention Map Reuse", name, str(schedule), method))
    return rows


def rows_for(steps: int, forecast: bool = True) -> list[Row]:
    """The table's rows for ``steps``: plain Euler at one and two steps fewer, then each node's presets (``forecast``:
    with the linear-forecast rows)."""
    plain = [Row("plain Euler", f"{n} steps", plain_steps=n) for n in (steps - 1, steps - 2) if n >= 1]
    return plain + encoder_rows(steps, forecast) + attention_rows(steps, forecast)


def _skipped(note: str) -> str:
    """The predictor's note, shortened to what it skipped: ``4/8 calls`` (encoder) or ``12/48 calls`` (attention)."""
    found = re.search(r"(?:skipped at|reused) (\d+)/(\d+)", note)
    return f"{found.group(1)}/{found.group(2)} calls" if found else note


@dataclass
class Result:
    row: Row
    psnr_mean: float = float("nan")
    psnr_worst: float = float("nan")
    flops_ratio: float = float("nan")
    skipped: str = ""
    vs_plain: str = ""


def measure(model: BuiltinDiT, steps: int, labels: tuple[int, ...], guidance: float = DEFAULT_GUIDANCE) -> list[Result]:
    seeds = tuple(range(len(labels)))
    spec, one = DiTSampleSpec(labels, seeds, steps, guidance), DiTSampleSpec(labels[:1], seeds[:1], steps, guidance)

    def run(n: int, make: Callable | None) -> tuple[torch.Tensor, object, int]:
        predictor = make(model) if make else None
        images = sample_dit(model, DiTSampleSpec(labels, seeds, n, guidance), predictor)
        one_spec = DiTSampleSpec(labels[:1], seeds[:1], n, guidance)
        _, flops = count_flops(lambda: sample_dit(model, one_spec, make(model) if make else None))
        return to_unit_range(images), predictor, flops

    reference = to_unit_range(sample_dit(model, spec))
    _, reference_flops = count_flops(lambda: sample_dit(model, one))

    def score(images: torch.Tensor) -> tuple[float, float]:
        values = [psnr(a, b, data_range=1.0) for a, b in zip(images, reference, strict=True)]
        return statistics.fmean(values), min(values)

    # Plain Euler at every shorter step count: the comparison at no more FLOPs (k of N steps cost k / N).
    plain = {}
    for n in range(1, steps):
        images, _, flops = run(n, None)
        plain[n] = (*score(images), flops / reference_flops)
    results = []
    for row in rows_for(steps):
        result = Result(row)
        if row.method is None and row.plain_steps:
            result.psnr_mean, result.psnr_worst, result.flops_ratio = plain[row.plain_steps]
        elif row.method is not None:
            images, predictor, flops = run(steps, row.method.make)
            result.psnr_mean, result.psnr_worst = score(images)
            result.flops_ratio = flops / reference_flops
            result.skipped = _skipped(getattr(predictor, "note", ""))
        if row.method is not None and math.isfinite(result.psnr_mean):
            cheaper = [n for n, (_, _, ratio) in plain.items() if ratio <= result.flops_ratio + 1e-9]
            if cheaper:
                best = max(cheaper, key=lambda n: plain[n][0])
                result.vs_plain = f"{result.psnr_mean - plain[best][0]:+.1f} dB (Euler {best}: {plain[best][0]:.1f})"
        results.append(result)
    return results


def table(by_steps: dict[int, list[Result]]) -> str:
    lines = [
        "| Steps | Node | Setting | Key steps / schedule (1 = compute) | Skipped | FLOPs vs full "
        "| PSNR dB mean / worst | vs plain Euler at no more FLOPs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for steps, results in by_steps.items():
        for r in results:
            row = r.row
            if row.refused:
                cells = [row.refused, "", "", "", ""]
            else:
                cells = [
                    f"`{row.plan}`" if row.plan else "–",
                    r.skipped or "–",
                    f"{r.flops_ratio:.3f}x",
                    f"{r.psnr_mean:.1f} / {r.psnr_worst:.1f}" if math.isfinite(r.psnr_mean) else "identical",
                    r.vs_plain or "–",
                ]
            lines.append(f"| {steps} | {row.node} | {row.setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict[int, list[Result]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default=",".join(map(str, STEP_COUNTS)), help="step counts, comma separated")
    p.add_argument("--images", type=int, default=10, help="images per run (classes 0-9 in turn, seeds 0..)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (results do not depend on it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_builtin_dit()
    labels = tuple(i % 10 for i in range(args.images))
    by_steps = {n: measure(model, n, labels) for n in (int(s) for s in args.steps.split(","))}
    print(table(by_steps))
    return by_steps


if __name__ == "__main__":
    main()
