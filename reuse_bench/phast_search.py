"""PHAST searched on the built-in model: ``python -m reuse_bench.phast_search`` writes assets/phast_schedules.json.

The search (``reuse_core.phast.phast_search``, the paper's greedy swap search from HURRY) runs 20-step DDIM
with reuse of 10 steps on its own seeds (``SEARCH_SEEDS``/``SEARCH_LABELS``, disjoint from the bench's
evaluation seeds), once per reuse mode (``--modes map,output``). The bench's full run repeats the search;
``--quick`` uses the stored result so that it stays fast.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from reuse_core.phast import phast_search
from reuse_core.schedules import ReuseSchedule

from .builtin_model import ASSETS, BuiltinModel, load_builtin_model
from .methods import AttentionReusePredictor, attention_config
from .sampling import DEFAULT_GUIDANCE, SampleSpec, sample

STORE_PATH = ASSETS / "phast_schedules.json"
SEARCH_SEEDS = (1000, 1001, 1002, 1003)
SEARCH_LABELS = (2, 5, 7, 8)
SEARCH_STEPS, SEARCH_REUSE = 20, 10


def search(
    model: BuiltinModel,
    mode: str,
    steps: int = SEARCH_STEPS,
    reuse: int = SEARCH_REUSE,
    max_rounds: int | None = None,
    progress=None,
) -> dict:
    spec = SampleSpec(SEARCH_LABELS, SEARCH_SEEDS, steps, DEFAULT_GUIDANCE)
    config = attention_config(mode)

    def run(schedule: ReuseSchedule) -> torch.Tensor:
        if progress is not None:
            progress()
        return sample(model, spec, AttentionReusePredictor(model, config, schedule))

    start = time.perf_counter()
    result = phast_search(run, lambda: sample(model, spec), steps, reuse, max_rounds=max_rounds)
    return {
        "schedule": str(result.best),
        "psnr": result.best_utility,
        "hurry_psnr": result.start_utility,
        "rounds": result.rounds,
        "evaluations": result.evaluations,
        "steps": steps,
        "reuse": reuse,
        "mode": mode,
        "seeds": list(SEARCH_SEEDS),
        "labels": list(SEARCH_LABELS),
        "guidance": DEFAULT_GUIDANCE,
        "wall_s": round(time.perf_counter() - start, 1),
    }


def load_stored(path: Path = STORE_PATH) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="map,output", help="comma-separated reuse modes to search (map, output)")
    p.add_argument("--max-rounds", type=int, default=None)
    p.add_argument("--out", type=Path, default=STORE_PATH, help="JSON file; searched modes replace their entries")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_builtin_model()
    for mode in args.modes.split(","):
        count = [0]

        def tick(count=count, mode=mode):
            count[0] += 1
            if count[0] % 10 == 0:
                print(f"{mode}: {count[0]} sampling runs", flush=True)

        found = search(model, mode, max_rounds=args.max_rounds, progress=tick)
        print(json.dumps(found), flush=True)
        stored = load_stored(args.out)  # re-read: another process may have written the other mode meanwhile
        stored[mode] = found
        args.out.write_text(json.dumps(stored, indent=1))


if __name__ == "__main__":
    main()
