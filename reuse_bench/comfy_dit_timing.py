"""Benchmark: Encoder Feature Propagation on a Flux-width transformer (random weights) in real ComfyUI.

The model is ComfyUI's own Flux (``comfy.supported_models.Flux`` + ``comfy.model_base.Flux``) at Flux.1's width
and block structure -- hidden size 3072, 24 heads, MLP ratio 4, 16-channel latent at patch 2, T5-sized (4096)
text and CLIP-sized (768) pooled conditioning, guidance embedding -- with the depth reduced from 19 double + 38
single blocks to ``DOUBLE`` + ``SINGLE`` so that it runs on 2 CPU cores. At the paper's 18/28 split the encoder is
the first 4 of 6 blocks (2 double + 2 single), holding about 75% of the per-token weights, close to the full
Flux.1's 74% (37 of 57 blocks: 19 double + 18 single). Random weights are fine for timing. Flux.1-dev is
guidance-distilled: cfg 1, one model call per step.

Part 1, time per block kind (median of ``repeats`` forwards, batch 1 at 256x256 = 256 image tokens +
``TEXT_TOKENS`` text tokens): a block replacement around every block times ``original_block``; ``rest`` is the
forward minus its blocks (embeddings, rotary, final layer). ``encoder_share`` = the encoder blocks' time over the
forward's. The ceiling of a preset with ``K`` key steps of ``N`` is ``N / (K + (N - K) * (1 - encoder_share))``.

Part 2, end to end (``steps`` euler/simple steps at 256x256): the unpatched run and each preset with parallel
decoding on and off, interleaved, ``rounds`` times; medians; ``speedup = median baseline / median preset``.

Run (on an otherwise idle machine; about 20 minutes on 2 cores)::

    python -m reuse_bench.comfy_dit_timing [--comfyui ../shared/comfyui/v0.33.0] [--rounds 3] [--quick]

``--quick`` is a smoke setting (hidden 256, 64x64, 4 steps, 1 round) that only checks the code paths.
API: ``run(comfy_path=None, quick=False, rounds=3) -> list[dict]`` (rows with ``"table"`` = ``"blocks"`` or
``"end_to_end"``).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

from . import sd15_comfy

DOUBLE, SINGLE = 2, 4
TEXT_TOKENS = 128
PRESETS = (("paper", 4), ("uniform", 4))


def flux_unet(hidden: int = 3072, heads: int = 24) -> dict:
    """Flux.1-dev's ``unet_config`` as ``comfy.model_detection`` derives it, at ``DOUBLE`` + ``SINGLE`` blocks."""
    head_dim = hidden // heads
    return dict(
        image_model="flux",
        in_channels=16,
        out_channels=16,
        vec_in_dim=768,
        context_in_dim=4096,
        hidden_size=hidden,
        mlp_ratio=4.0,
        num_heads=heads,
        depth=DOUBLE,
        depth_single_blocks=SINGLE,
        axes_dim=[head_dim - 2 * (head_dim * 7 // 16), head_dim * 7 // 16, head_dim * 7 // 16],  # 16/56/56 at 128
        theta=10000,
        patch_size=2,
        qkv_bias=True,
        guidance_embed=True,
        txt_ids_dims=[],
    )


def build_flux(comfy_path=None, hidden: int = 3072, heads: int = 24, seed: int = 0):
    """The reduced-depth Flux (random weights) as a ComfyUI ``ModelPatcher`` on the CPU."""
    sd15_comfy.import_comfy(comfy_path)
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    from comfy.ldm.flux.model import FluxParams

    names = set(FluxParams.__dataclass_fields__) | {"image_model"}
    unet = {k: v for k, v in flux_unet(hidden, heads).items() if k in names}
    config = comfy.supported_models.Flux(unet)
    config.unet_config.update(unet)
    config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    model = comfy.model_base.Flux(config, device=cpu)
    sd15_comfy.init_weights(model, seed, std=0.02)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def conditioning(seed: int = 0, tokens: int = TEXT_TOKENS):
    gen = torch.Generator().manual_seed(seed)
    fields = {"pooled_output": torch.randn(1, 768, generator=gen), "guidance": 3.5}
    positive = [[torch.randn(1, tokens, 4096, generator=gen), fields]]
    return positive, positive  # cfg 1: the negative is never evaluated


def _block_timer(times: dict):
    def replace(args, extra):
        start = time.perf_counter()
        out = extra["original_block"](args)
        times.setdefault(replace.kind, []).append(time.perf_counter() - start)
        return out

    return replace


def block_timings(patcher, pack, *, size: int, repeats: int, fraction: float) -> dict:
    """Part 1 (see the module docstring)."""
    import comfy.patcher_extension

    net = patcher.model.diffusion_model
    times: dict[str, list[float]] = {}
    timed = patcher.clone()
    for kind, count in (("double_block", len(net.double_blocks)), ("single_block", len(net.single_blocks))):
        for i in range(count):
            replace = _block_timer(times)
            replace.kind = kind
            timed.set_model_patch_replace(replace, "dit", kind, i)
    forwards: list[float] = []

    def forward_timer(executor, *args, **kwargs):
        start = time.perf_counter()
        try:
            return executor(*args, **kwargs)
        finally:
            forwards.append(time.perf_counter() - start)

    timed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "reuse_bench", forward_timer)
    positive, negative = conditioning()
    sd15_comfy.sample(timed, steps=1, size=size, cfg=1.0, positive=positive, negative=negative, latent_channels=16)
    times.clear(), forwards.clear()  # the first call warms up
    sd15_comfy.sample(
        timed, steps=repeats, size=size, cfg=1.0, positive=positive, negative=negative, latent_channels=16
    )
    double = statistics.median(times["double_block"])
    single = statistics.median(times["single_block"])
    forward = statistics.median(forwards)
    split = pack["dit"].BlockSplit.of(net, fraction)
    blocks = [double] * len(net.double_blocks) + [single] * len(net.single_blocks)
    return {
        "table": "blocks",
        "size": size,
        "tokens": (size // 16) ** 2 + TEXT_TOKENS,
        "double_block_s": double,
        "single_block_s": single,
        "rest_s": forward - sum(blocks),
        "forward_s": forward,
        "encoder_blocks": split.encoder_blocks,
        "depth": split.depth,
        "encoder_share": sum(blocks[: split.encoder_blocks]) / forward,
    }


def ceiling(steps: int, key_steps: int, encoder_share: float) -> float:
    return steps / (key_steps + (steps - key_steps) * (1.0 - encoder_share))


def end_to_end(patcher, pack, *, steps: int, size: int, rounds: int, encoder_share: float) -> list[dict]:
    """Part 2 (see the module docstring)."""
    engine, keys, node = pack["engine"], pack["keys"], pack["node"]
    positive, negative = conditioning()

    def wall(model) -> float:
        return sd15_comfy.sample(
            model,
            steps=steps,
            size=size,
            cfg=1.0,
            sampler="euler",
            scheduler="simple",
            positive=positive,
            negative=negative,
            latent_channels=16,
        ).wall_s

    variants = {("baseline", None, None): patcher}
    for preset, k in PRESETS:
        spec = keys.KeyStepSpec(preset, k)
        for parallel in (True, False):
            config = engine.EncoderPropagationConfig(key_steps=spec, parallel_decoding=parallel)
            variants[(preset, k, parallel)] = node.apply_encoder_propagation(patcher, config)
    wall(patcher)  # warm-up
    walls: dict = {key: [] for key in variants}
    for _ in range(rounds):
        for key, model in variants.items():
            walls[key].append(wall(model))
    baseline = statistics.median(walls[("baseline", None, None)])
    rows = []
    for (preset, k, parallel), times in walls.items():
        if preset == "baseline":
            continue
        spec = keys.KeyStepSpec(preset, k)
        key_count = len(spec.key_steps(steps))
        rows.append(
            {
                "table": "end_to_end",
                "preset": spec.label,
                "parallel": parallel,
                "steps": steps,
                "size": size,
                "rounds": rounds,
                "key_steps": key_count,
                "wall_s": statistics.median(times),
                "baseline_wall_s": baseline,
                "speedup": baseline / statistics.median(times),
                "ceiling": ceiling(steps, key_count, encoder_share),
            }
        )
    for row in rows:
        row["of_ceiling"] = row["speedup"] / row["ceiling"]
    return rows


def load_pack(comfy_path=None):
    package = sd15_comfy.load_pack(comfy_path).__name__
    return {
        "node": importlib.import_module(f"{package}.nodes.encoder_hooks"),
        "dit": importlib.import_module(f"{package}.nodes.dit_host"),
        "engine": importlib.import_module(f"{package}.reuse_core.encoder_engine"),
        "keys": importlib.import_module(f"{package}.reuse_core.key_steps"),
    }


def run(comfy_path=None, quick: bool = False, rounds: int = 3) -> list[dict]:
    pack = load_pack(comfy_path)
    hidden, heads, size, steps, repeats = (256, 4, 64, 4, 2) if quick else (3072, 24, 256, 20, 5)
    rounds = 1 if quick else rounds
    patcher = build_flux(comfy_path, hidden, heads)
    fraction = pack["engine"].DIT_PAPER_ENCODER_FRACTION
    blocks = block_timings(patcher, pack, size=size, repeats=repeats, fraction=fraction)
    rows = [blocks]
    rows += end_to_end(patcher, pack, steps=steps, size=size, rounds=rounds, encoder_share=blocks["encoder_share"])
    return rows


def markdown(rows: list[dict]) -> str:
    b = next(r for r in rows if r["table"] == "blocks")
    lines = [
        f"Flux-width transformer ({DOUBLE} double + {SINGLE} single blocks), batch 1 at {b['size']}x{b['size']} "
        f"({b['tokens']} tokens), median seconds per call",
        "",
        "| double block | single block | rest of the forward | forward | encoder | encoder share |",
        "|---|---|---|---|---|---|",
        f"| {b['double_block_s']:.3f} | {b['single_block_s']:.3f} | {b['rest_s']:.3f} | {b['forward_s']:.3f} "
        f"| first {b['encoder_blocks']} of {b['depth']} blocks | {b['encoder_share']:.1%} |",
    ]
    e2e = [r for r in rows if r["table"] == "end_to_end"]
    first = e2e[0]
    lines += [
        "",
        f"End to end, {first['steps']} steps at {first['size']}x{first['size']}, median of {first['rounds']} "
        f"interleaved rounds (baseline {first['baseline_wall_s']:.1f} s)",
        "",
        "| preset | parallel decoding | key steps | wall (s) | speed-up | ceiling | of ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in e2e:
        lines.append(
            f"| {r['preset']} | {'on' if r['parallel'] else 'off'} | {r['key_steps']}/{r['steps']} | {r['wall_s']:.1f} "
            f"| {r['speedup']:.2f}x | {r['ceiling']:.2f}x | {r['of_ceiling']:.0%} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=None, help="ComfyUI tree (default: COMFYUI_PATH, ../shared/comfyui)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved end-to-end rounds (median)")
    parser.add_argument("--quick", action="store_true", help="smoke setting: hidden 256, 64x64, 4 steps, 1 round")
    args = parser.parse_args(argv)
    print(markdown(run(args.comfyui, quick=args.quick, rounds=args.rounds)))


if __name__ == "__main__":
    main()
