"""``python -m reuse_bench``: the main job. Samples the built-in MNIST models (U-Net and DiT) with and without every
method and writes a Markdown table, a JSON file, a comparison grid and a PSNR-vs-speed plot to ``--out``.

``--quick`` (4 images, 1 timing repeat, stored PHAST search) keeps it to about three minutes on 2 CPU cores; the
full run (10 images, 5 repeats, PHAST searched here) is the project's benchmark. ``--comfyui PATH`` instead
times the methods in real ComfyUI on a full-size SD1.5-shaped U-Net with random weights (timing columns only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m reuse_bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small, fast run (about 3 min on 2 CPU cores)")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output folder (default: bench_out/)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats per method (default 5; quick 1)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument(
        "--stored-phast",
        action="store_true",
        help="full run: use the PHAST schedules stored in assets/phast_schedules.json (made by "
        "`python -m reuse_bench.phast_search`, the same deterministic search) instead of searching again",
    )
    p.add_argument(
        "--comfyui",
        type=Path,
        default=None,
        metavar="PATH",
        help="time the methods in the real ComfyUI checked out at PATH instead (SD1.5-shaped U-Net, "
        "random weights, timing columns only)",
    )
    return p.parse_args(argv)


def run_comfyui(path: Path, quick: bool, out: Path) -> None:
    if not (path / "comfy").is_dir():
        raise SystemExit(f"--comfyui: {path} is not a ComfyUI checkout (no comfy/ folder in it); pass its root folder")
    from . import comfy_attention_timing, comfy_encoder_timing
    from .comfy_report import write_comfy_tables

    tables = {
        "Attention Map Reuse": comfy_attention_timing.run(path, quick=quick),
        "Encoder Feature Propagation": comfy_encoder_timing.run(path, quick=quick),
    }
    written = write_comfy_tables(tables, out, quick=quick, comfyui=path)
    print(written["table"].read_text())
    print(f"wrote {', '.join(str(p) for p in written.values())}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.comfyui is not None:
        run_comfyui(args.comfyui, args.quick, args.out)
        return 0

    from tqdm import tqdm

    from .bench import BenchSettings, run_bench
    from .report import write_all

    settings = BenchSettings.for_mode(args.quick, args.repeats, search_phast=not args.stored_phast)
    start = time.perf_counter()

    def progress(total):
        return tqdm(total=total, desc="reuse_bench", unit="run", file=sys.stderr, disable=None)

    result = run_bench(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True), progress_factory=progress)
    paths = write_all(result, args.out)
    print(paths["table"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
