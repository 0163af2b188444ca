"""Bench outputs: Markdown table, JSON, comparison grid PNG (rows = methods, columns = seeds), PSNR-vs-speed PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .sampling import to_unit_range

TABLE_HEADER = (
    "| Method | Steps | Time vs ref (median) | Model FLOPs vs ref | Work skipped | PSNR dB mean / worst "
    "| SSIM mean / worst | Class acc. | Peak tensor MB | Plain sampler at equal time: steps, PSNR |"
)


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


def table_row(r: dict) -> str:
    ratio = f"{r['time_ratio']:.2f}x ({r['median_s'] * 1000:.0f} ms)"
    flops = f"{r['flops_ratio']:.2f}" if r.get("flops_ratio") is not None else "n/a"
    if r["family"] == "reference":
        equal = "-"
    elif r["equal_time_ddim_steps"] >= r["steps"]:
        equal = f"{r['equal_time_ddim_steps']} (method not faster)"
    else:
        equal = f"{r['equal_time_best_steps']} of ≤{r['equal_time_ddim_steps']}, {_db(r['equal_time_ddim_psnr_mean'])}"
    cells = [
        r["method"],
        str(r["steps"]),
        ratio,
        flops,
        r["work_skipped"] or "-",
        f"{_db(r['psnr_mean'])} / {_db(r['psnr_worst'])}",
        f"{r['ssim_mean']:.3f} / {r['ssim_worst']:.3f}",
        f"{r['classifier_accuracy'] * 100:.0f}%",
        f"{r['peak_tensor_bytes'] / 2**20:.1f}",
        equal,
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    lines = [
        f"# reuse_bench results ({'quick' if s['quick'] else 'full'})",
        "",
        f"{len(s['seeds'])} images (classes {s['labels']}, seeds {s['seeds']}); U-Net rows: DDIM eta 0, CFG "
        f"{s['guidance']}; DiT rows (`DiT: ...`, the Flux transformer of `builtin_dit`): {s['dit_sampler']}, CFG "
        f"{s['dit_guidance']}; {s['repeats']} interleaved timing repeat(s)"
        f"{' (quick: time ratios are noisy on a busy machine)' if s['quick'] else ''}; "
        f"{m['processor']}, {m['cpu_count']} CPUs, "
        f"torch {m['torch']} with {m['torch_threads']} threads; {result['date']}.",
        "Time and FLOPs are relative to the same model's full-compute run with the same step count (PSNR/SSIM too, "
        "per seed, images in [0, 1]); the plain sampler at equal time is that model's own sampler (DDIM or Euler) "
        'at the best of the step counts that fit in the method\'s time ("k of ≤n": k steps; n fit). '
        "Class acc. = digit classifier agrees with the requested class "
        f"(classifier held-out accuracy on real digits: {result['classifier_held_out_accuracy']}). "
        "Peak tensor MB = peak live tensor storage allocated during a one-image run (CFG batch 2); "
        "FLOPs are measured on the same run.",
        "",
        TABLE_HEADER,
        "|" + "|".join(["---"] * (TABLE_HEADER.count("|") - 1)) + "|",
    ]
    lines += [table_row(r) for r in result["rows"]]
    methods = [r for r in result["rows"] if r["family"] != "reference"]
    slower = [f"{r['method']} ({r['steps']} steps)" for r in methods if r["equal_time_ddim_steps"] >= r["steps"]]
    not_better = [
        f"{r['method']} ({r['steps']} steps)"
        for r in methods
        if r["equal_time_ddim_steps"] < r["steps"] and r["equal_time_ddim_psnr_mean"] >= r["psnr_mean"]
    ]
    lines.append("")
    if slower:
        lines.append(
            "Not faster than full compute here (the plain sampler at equal time needs as many steps): "
            + "; ".join(slower)
            + "."
        )
    if not_better:
        lines.append(
            "Not better than simply running fewer plain steps in the same time (equal or higher PSNR): "
            + "; ".join(not_better)
            + "."
        )
    gains = forecast_gains(result["rows"])
    if gains:
        lines.append("")
        lines.append(
            "Forecast linear against reuse at the same schedule (mean PSNR, dB): "
            + "; ".join(f"{name}: {old:.1f} -> {new:.1f} ({new - old:+.1f})" for name, old, new in gains)
            + "."
        )
    lines.append("")
    lines.append(
        "PHAST schedules: "
        + "; ".join(
            f"{mode} `{p['schedule']}` (PSNR {p['psnr']:.2f} dB vs HURRY {p['hurry_psnr']:.2f} dB, {p['source']})"
            for mode, p in result["phast"].items()
        )
        + "."
    )
    return "\n".join(lines) + "\n"


def forecast_gains(rows: list[dict]) -> list[tuple[str, float, float]]:
    """(reuse row name, its PSNR, its forecast twin's PSNR) for every forecast row whose reuse twin is in the run: the
    row of the same name without the forecast, else without ", no injection" too (the U-Net's calibrated rows: the
    reuse fit runs with the paper's noise injection, the forecast fit without)."""
    by_name = {(r.get("model"), r["steps"], r["method"]): r for r in rows}
    gains = []
    for r in rows:
        if ", forecast " in r["method"]:
            base = r["method"].split(", forecast ")[0]
            for name in (base, base.replace(", no injection", "")):
                twin = by_name.get((r.get("model"), r["steps"], name))
                if twin is not None:
                    gains.append((twin["method"], twin["psnr_mean"], r["psnr_mean"]))
                    break
    return gains


def write_json(result: dict, path: Path) -> None:
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return "inf" if value > 0 else "-inf"
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not str(k).startswith("_")}  # int keys: step counts
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(result), indent=1))


def grid_png(result: dict, path: Path, scale: int = 2) -> None:
    """Rows = methods (label on the left), columns = seeds; each cell the final 32x32 digit."""
    from PIL import Image, ImageDraw, ImageFont

    images = result["_images"]
    names = list(images)
    first = next(iter(images.values()))
    n, h, w = first.shape[0], first.shape[-2] * scale, first.shape[-1] * scale
    label_w, pad = 380, 2
    font = ImageFont.load_default()
    canvas = Image.new("L", (label_w + n * (w + pad), 20 + len(names) * (h + pad)), 255)
    draw = ImageDraw.Draw(canvas)
    s = result["settings"]
    for j in range(n):
        draw.text((label_w + j * (w + pad) + 2, 4), f"{s['labels'][j]}/s{s['seeds'][j]}", fill=0, font=font)
    for i, name in enumerate(names):
        y = 20 + i * (h + pad)
        draw.text((4, y + h // 2 - 6), name[:62], fill=0, font=font)
        pixels = (to_unit_range(images[name]) * 255).round().to(torch.uint8)
        for j in range(n):
            cell = Image.fromarray(pixels[j, 0].numpy(), mode="L").resize((w, h), Image.NEAREST)
            canvas.paste(cell, (label_w + j * (w + pad), y))
    canvas.save(path)


def plot_png(result: dict, path: Path) -> None:
    """PSNR (mean) against speed-up, one panel per model and reference step count; fewer-step plain-sampler points
    for comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.get("model", "U-Net"), r["steps"]) for r in result["rows"]}, key=lambda p: (p[0] != "U-Net", p))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    colours = {"attention": "tab:blue", "encoder": "tab:orange", "both": "tab:green", "peer": "tab:red"}
    for ax, (model, steps) in zip(axes[0], panels, strict=True):
        rows = [
            r
            for r in result["rows"]
            if r.get("model", "U-Net") == model and r["steps"] == steps and r["family"] != "reference"
        ]
        plain = "Euler" if model == "DiT" else "DDIM"
        finite = [r["psnr_mean"] for r in rows if math.isfinite(r["psnr_mean"])]
        cap = max([*finite, 40.0]) + 5
        # The plain sampler's fewer-steps curve (speed-up of n steps = steps / n): what a method has to beat.
        by_reference = result.get("fewer_steps", {}).get(model) or {}
        curve = by_reference.get(steps) or by_reference.get(str(steps)) or {}  # str keys once read back from JSON
        points = sorted((steps / int(n), v) for n, v in curve.items() if math.isfinite(v))
        if points:
            ax.plot(*zip(*points, strict=True), color="black", lw=0.8, ls="--", label=f"{plain}, fewer steps")
        for r in rows:
            y = r["psnr_mean"] if math.isfinite(r["psnr_mean"]) else cap
            forecast = r["settings"].get("forecast", "reuse") != "reuse"
            ax.scatter(1 / r["time_ratio"], y, color=colours[r["family"]], s=40 if forecast else 30,
                       marker="D" if forecast else "o", edgecolors="black" if forecast else "none")  # fmt: skip
            ax.annotate(
                r["method"].replace("Encoder propagation", "EP").replace("Attention reuse", "AR").removeprefix("DiT: "),
                (1 / r["time_ratio"], y),
                fontsize=6,
                xytext=(3, 2),
                textcoords="offset points",
            )
            n = r["equal_time_ddim_steps"]
            if n < steps and math.isfinite(r["equal_time_ddim_psnr_mean"]):
                ax.scatter(steps / n, r["equal_time_ddim_psnr_mean"], color="black", marker="x", s=25)
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.set_title(f"{model}: vs full-compute {plain} {steps} (x = {plain} with fewer steps, same time)", fontsize=9)
        ax.set_xlabel("speed-up (reference time / method time)")
        ax.set_ylabel("PSNR vs reference, dB (mean over seeds)")
        for family, colour in colours.items():
            ax.scatter([], [], color=colour, label=family)
        ax.scatter([], [], color="white", edgecolors="black", marker="D", label="forecast linear (diamond)")
        ax.scatter([], [], color="black", marker="x", label=f"fewer-step {plain} at the method's time")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "table": out / "results.md",
        "json": out / "results.json",
        "grid": out / "grid.png",
        "plot": out / "psnr_vs_speed.png",
    }
    paths["table"].write_text(markdown(result))
    write_json(result, paths["json"])
    grid_png(result, paths["grid"])
    plot_png(result, paths["plot"])
    return paths
