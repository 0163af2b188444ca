"""Benchmark: Attention Map Reuse on a full-size SD1.5 U-Net (random weights) in real ComfyUI.

Measures, all in one process on the CPU:

1. U-Net time of one CFG step (batch 2) at each size: a baseline step (unpatched model), and for each mode
   ("map", "output") a storing step (map: fused attention + the explicit softmax map kept; output: fused
   attention + keeping the outputs) and a reuse step. Each is the median of ``repeats`` steps: the patched runs use the
   custom schedule ``10`` * repeats, so every even step stores and every odd step reuses.
2. End-to-end wall time of ``e2e_steps`` steps at ``e2e_size`` for the baseline, HURRY(10) and the PHAST
   preset in both modes, as ratios against the baseline, plus PSNR of the final latent against the baseline.

Usage (run the full one on an otherwise idle machine; 512x512 steps take 15-25 s each on 2 cores)::

    python -m reuse_bench.comfy_attention_timing --comfyui ../shared/comfyui/v0.33.0            # full, prints Markdown
    python -m reuse_bench.comfy_attention_timing --comfyui ../shared/comfyui/v0.33.0 --smoke    # 64x64, seconds

``run(comfy_path, quick=False) -> list[dict]`` returns the rows (``quick`` = the smoke settings).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import statistics

from . import sd15_comfy

MODES = ("map", "output")


def _node(comfy_path):
    sd15_comfy.load_pack(comfy_path)
    return importlib.import_module(f"{sd15_comfy.PACK_MODULE}.nodes.attention_node").AttentionMapReuse


def _patch(node, model, *, strategy, mode, reuse_steps=0, custom_schedule="1", budget_mb):
    return node.execute(
        model,
        strategy=strategy,
        reuse_steps=reuse_steps,
        reuse_fraction=0.0,
        custom_schedule=custom_schedule,
        attention="both",
        mode=mode,
        cache_device="same as model",
        memory_budget_mb=budget_mb,
        verbose=False,
    ).result[0]


def step_rows(node, model, size: int, repeats: int, budget_mb: int) -> list[dict]:
    baseline = sd15_comfy.sample(model, steps=repeats, size=size, record_step_times=True).step_unet_s
    base = statistics.median(baseline)
    rows = [dict(section="step", size=size, kind="baseline step", median_s=base, ratio=1.0, samples=len(baseline))]
    for mode in MODES:
        patched = _patch(node, model, strategy="custom", mode=mode, custom_schedule="10" * repeats, budget_mb=budget_mb)
        times = sd15_comfy.sample(patched, steps=2 * repeats, size=size, record_step_times=True).step_unet_s
        for label, picked in (("store", times[0::2]), ("reuse", times[1::2])):
            median = statistics.median(picked)
            rows.append(
                dict(
                    section="step",
                    size=size,
                    kind=f"{mode} {label} step",
                    median_s=median,
                    ratio=median / base,
                    samples=len(picked),
                )
            )
    return rows


def e2e_rows(node, model, size: int, steps: int, reuse: int, repeats: int, budget_mb: int) -> list[dict]:
    from reuse_core.metrics import psnr

    variants = [("baseline", None, None)] + [
        (f"{strategy} {reuse} {mode}", strategy, mode) for strategy in ("hurry", "phast") for mode in MODES
    ]
    walls: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    latents = {}
    for _ in range(repeats):  # interleaved, so drifting machine load hits every variant alike
        for name, strategy, mode in variants:
            m = (
                model
                if strategy is None
                else _patch(node, model, strategy=strategy, mode=mode, reuse_steps=reuse, budget_mb=budget_mb)
            )
            result = sd15_comfy.sample(m, steps=steps, size=size)
            walls[name].append(result.wall_s)
            latents[name] = result.latent
    base = statistics.median(walls["baseline"])
    return [
        dict(
            section="e2e",
            size=size,
            kind=name,
            steps=steps,
            median_s=statistics.median(walls[name]),
            ratio=statistics.median(walls[name]) / base,
            psnr_db=psnr(latents[name], latents["baseline"]),
            samples=repeats,
        )
        for name, _, _ in variants
    ]


def run(
    comfy_path=None,
    quick: bool = False,
    *,
    sizes=(256, 512),
    repeats: int = 3,
    e2e_size: int = 256,
    e2e_steps: int = 20,
    e2e_reuse: int = 10,
    e2e_repeats: int = 1,
    budget_mb: int = 8192,
) -> list[dict]:
    if quick:
        sizes, repeats, e2e_size, e2e_steps, e2e_reuse, e2e_repeats = (64,), 1, 64, 4, 2, 1
    node = _node(comfy_path)
    model = sd15_comfy.build_sd15(comfy_path)
    rows = []
    for size in sizes:
        rows += step_rows(node, model, size, repeats, budget_mb)
    rows += e2e_rows(node, model, e2e_size, e2e_steps, e2e_reuse, e2e_repeats, budget_mb)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| size | what | median U-Net s / step | vs baseline step | samples |", "|---|---|---|---|---|"]
    for r in rows:
        if r["section"] == "step":
            lines.append(
                f"| {r['size']}x{r['size']} | {r['kind']} | {r['median_s']:.3f} | {r['ratio']:.2f}x | {r['samples']} |"
            )
    lines += [
        "",
        "| size | steps | run | wall s | vs baseline | PSNR vs baseline (dB) | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["section"] == "e2e":
            lines.append(
                f"| {r['size']}x{r['size']} | {r['steps']} | {r['kind']} | {r['median_s']:.2f} | "
                f"{r['ratio']:.3f} | {r['psnr_db']:.2f} | {r['samples']} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", default=None, help="ComfyUI tree (default: COMFYUI_PATH, ../shared/comfyui)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings (64x64, 1 repeat, 4 steps)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="pixel sizes for step timings")
    parser.add_argument("--repeats", type=int, default=3, help="steps per median for step timings")
    parser.add_argument("--e2e-repeats", type=int, default=1, help="end-to-end runs per variant (median)")
    parser.add_argument("--budget-mb", type=int, default=8192, help="memory_budget_mb of the patched models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the node's per-run summary lines
    rows = run(
        args.comfyui,
        quick=args.smoke,
        sizes=tuple(args.sizes),
        repeats=args.repeats,
        e2e_repeats=args.e2e_repeats,
        budget_mb=args.budget_mb,
    )
    print(markdown(rows))


if __name__ == "__main__":
    main()
