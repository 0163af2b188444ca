"""Class accuracy of the built-in DiT at full compute: ``python -m reuse_bench.evaluate_dit``.

Samples ``--per-class`` images of every digit (seeds 10000 + i, as ``evaluate_model`` does for the U-Net) with
full-compute Euler flow sampling and reports how often the shipped digit classifier agrees with the requested
class, overall and per class.
"""

from __future__ import annotations

import argparse
import json

import torch

from .builtin_dit import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_builtin_dit
from .digit_classifier import load_classifier
from .evaluate_model import SEED_BASE, accuracy_record
from .sampling_dit import DiTSampleSpec, sample_dit


def class_accuracy(
    model, classifier, per_class: int, steps: int, guidance: float = DEFAULT_GUIDANCE, seed_base: int = SEED_BASE
) -> dict:
    labels = tuple(c for _ in range(per_class) for c in range(10))
    seeds = tuple(seed_base + i for i in range(len(labels)))
    predicted = classifier.predict(sample_dit(model, DiTSampleSpec(labels, seeds, steps, guidance)))
    return accuracy_record(predicted, labels, steps, guidance)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, nargs="+", default=[DEFAULT_STEPS])
    p.add_argument("--guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE])
    p.add_argument("--seed-base", type=int, default=SEED_BASE)
    p.add_argument("--weights", default=None, help="another weights file (default: the shipped one)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_builtin_dit(args.weights) if args.weights else load_builtin_dit()
    classifier = load_classifier()
    for steps in args.steps:
        for g in args.guidance:
            result = class_accuracy(model, classifier, args.per_class, steps, g, args.seed_base)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
