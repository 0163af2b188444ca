"""Benchmark: Encoder Feature Propagation on a full-size SD1.5 U-Net (random weights) in real ComfyUI.

Random weights are fine: the cost of a step does not depend on the weight values. Everything runs in one
process on the CPU (ComfyUI in CPU mode), so ratios compare like with like.

Part 1, U-Net timings (CFG batch 2, median of ``repeats``, at each image size):
  * ``full_step_s``: one plain U-Net forward (the unpatched cost of a step);
  * ``key_step_s``: a key step, i.e. the same forward while capturing the encoder features;
  * ``non_key_step_s``: a decoder-only step on cached features;
  * ``decoder_batch4_s``: one parallel batch of 4 decoder-only steps (batch 8);
  * ``encoder_share = 1 - non_key_step_s / full_step_s``.
Part 2, end to end (20 steps, 256x256, euler/normal, cfg 7, one run each, baseline timed before and after
the patched runs and averaged): ``speedup = baseline wall / patched wall`` for the paper preset (scaled to 20
steps), uniform k=2/3/4 and one_pass, with parallel decoding on and off (``max_decoders_per_batch`` 4). Each row
carries the ceiling implied by the measured encoder share ``e`` (Part 1 at the same size) for its ``K`` key
steps out of ``N``: ``N / (K + (N - K) * (1 - e))``; wall time also includes the sampler, CFG and the
latent bookkeeping, which the ceiling ignores.

Run (on an otherwise idle machine)::

    python -m reuse_bench.comfy_encoder_timing [--comfyui ../shared/comfyui/v0.33.0] [--quick]

``--quick`` is a smoke setting (64x64, 4 steps, 1 repeat) that only checks the code paths.
API: ``run(comfy_path=None, quick=False) -> list[dict]`` (rows with ``"table": "unet"`` or ``"end_to_end"``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import time

import torch

from . import sd15_comfy

PRESETS = (("paper", 4), ("uniform", 2), ("uniform", 3), ("uniform", 4), ("one_pass", 4))


def load_pack(comfy_path=None):
    """The pack's encoder-propagation modules, imported as ComfyUI would load the pack."""
    package = sd15_comfy.load_pack(comfy_path).__name__
    return {
        "node": importlib.import_module(f"{package}.nodes.encoder_hooks"),
        "host": importlib.import_module(f"{package}.nodes.unet_decoder"),
        "engine": importlib.import_module(f"{package}.reuse_core.encoder_engine"),
        "keys": importlib.import_module(f"{package}.reuse_core.key_steps"),
    }


def _median_time(fn, repeats: int) -> float:
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def unet_timings(patcher, pack, size: int, repeats: int, seed: int = 0) -> dict:
    """Part 1 at one image size (see the module docstring)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    net = patcher.model.diffusion_model
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, size // 8, size // 8, generator=gen)
    context = torch.randn(2, 77, 768, generator=gen)
    timesteps = torch.tensor([500.0, 500.0])
    # The executor is the U-Net module itself: its forward is ComfyUI's native forward (no wrappers here).
    host = pack["host"].ComfyUNetHost(net, net, None, {}, {})
    with torch.inference_mode():
        _, features = host.full_forward(x, timesteps, context, capture=True)  # warm-up, and the cache
        batch4 = features.tile(4)
        full = _median_time(lambda: host.full_forward(x, timesteps, context, capture=False), repeats)
        key = _median_time(lambda: host.full_forward(x, timesteps, context, capture=True), repeats)
        non_key = _median_time(lambda: host.decode(features, timesteps, context), repeats)
        four = _median_time(lambda: host.decode(batch4, timesteps.repeat(4), context.repeat(4, 1, 1)), repeats)
    return {
        "table": "unet",
        "size": size,
        "full_step_s": full,
        "key_step_s": key,
        "non_key_step_s": non_key,
        "decoder_batch4_s": four,
        "decoder_batch4_per_step_s": four / 4,
        "encoder_share": 1.0 - non_key / full,
    }


def ceiling(steps: int, key_steps: int, encoder_share: float) -> float:
    """Best possible U-Net speed-up with ``key_steps`` full steps of ``steps`` and the given encoder share."""
    return steps / (key_steps + (steps - key_steps) * (1.0 - encoder_share))


def end_to_end(patcher, pack, *, steps: int, size: int, encoder_share: float) -> list[dict]:
    """Part 2 (see the module docstring)."""
    engine, keys, node = pack["engine"], pack["keys"], pack["node"]
    sd15_comfy.sample(patcher, steps=2, size=size)  # warm-up
    before = sd15_comfy.sample(patcher, steps=steps, size=size).wall_s
    runs = []
    for preset, k in PRESETS:
        spec = keys.KeyStepSpec(preset, k)
        key_count = len(spec.key_steps(steps))
        for parallel in (True, False):
            config = engine.EncoderPropagationConfig(key_steps=spec, parallel_decoding=parallel)
            patched = node.apply_encoder_propagation(patcher, config)
            wall = sd15_comfy.sample(patched, steps=steps, size=size).wall_s
            runs.append((preset, k, parallel, key_count, wall))
    after = sd15_comfy.sample(patcher, steps=steps, size=size).wall_s
    baseline = (before + after) / 2
    rows = []
    for preset, k, parallel, key_count, wall in runs:
        rows.append(
            {
                "table": "end_to_end",
                "preset": keys.KeyStepSpec(preset, k).label,
                "parallel": parallel,
                "steps": steps,
                "size": size,
                "key_steps": key_count,
                "wall_s": wall,
                "baseline_wall_s": baseline,
                "speedup": baseline / wall,
                "ceiling": ceiling(steps, key_count, encoder_share),
            }
        )
    return rows


def run(comfy_path=None, quick: bool = False) -> list[dict]:
    """Both parts; returns row dicts (``table`` = ``"unet"`` or ``"end_to_end"``)."""
    pack = load_pack(comfy_path)
    patcher = sd15_comfy.build_sd15(comfy_path)
    sizes, repeats, steps, e2e_size = ((64,), 1, 4, 64) if quick else ((256, 512), 3, 20, 256)
    rows = [unet_timings(patcher, pack, size, repeats) for size in sizes]
    share = next(r["encoder_share"] for r in rows if r["size"] == e2e_size)
    rows += end_to_end(patcher, pack, steps=steps, size=e2e_size, encoder_share=share)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "U-Net time per call (CFG batch 2, median; seconds)",
        "",
        "| size | full step | key step | non-key step | 4 non-key decoders (batch) | per step | encoder share |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["table"] == "unet"):
        lines.append(
            f"| {r['size']}x{r['size']} | {r['full_step_s']:.3f} | {r['key_step_s']:.3f} | {r['non_key_step_s']:.3f} "
            f"| {r['decoder_batch4_s']:.3f} | {r['decoder_batch4_per_step_s']:.3f} | {r['encoder_share']:.1%} |"
        )
    e2e = [r for r in rows if r["table"] == "end_to_end"]
    if e2e:
        first = e2e[0]
        lines += [
            "",
            f"End to end, {first['steps']} steps at {first['size']}x{first['size']} (baseline "
            f"{first['baseline_wall_s']:.2f} s)",
            "",
            "| preset | parallel decoding | key steps | wall (s) | speed-up | ceiling |",
            "|---|---|---|---|---|---|",
        ]
        for r in e2e:
            lines.append(
                f"| {r['preset']} | {'on' if r['parallel'] else 'off'} | {r['key_steps']}/{r['steps']} "
                f"| {r['wall_s']:.2f} | {r['speedup']:.2f}x | {r['ceiling']:.2f}x |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=None, help="ComfyUI tree (default: COMFYUI_PATH, ../shared/comfyui)")
    parser.add_argument("--quick", action="store_true", help="smoke setting: 64x64, 4 steps, 1 repeat")
    args = parser.parse_args(argv)
    print(markdown(run(args.comfyui, quick=args.quick)))


if __name__ == "__main__":
    main()
