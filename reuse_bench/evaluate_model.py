"""Class accuracy of the built-in model at full compute: ``python -m reuse_bench.evaluate_model``.

Samples ``--per-class`` images of every digit (seeds 10000 + i, disjoint from the bench's and the guidance
check's seeds) with full-compute DDIM and reports how often the shipped digit classifier agrees with the
requested class, overall and per class.
"""

from __future__ import annotations

import argparse
import json

import torch

from .builtin_model import load_builtin_model
from .digit_classifier import load_classifier
from .sampling import DEFAULT_GUIDANCE, SampleSpec, sample

SEED_BASE = 10000


def class_accuracy(
    model, classifier, per_class: int, steps: int, guidance: float = DEFAULT_GUIDANCE, batch: int = 50
) -> dict:
    labels = [c for _ in range(per_class) for c in range(10)]
    predicted = []
    for start in range(0, len(labels), batch):
        chunk = tuple(labels[start : start + batch])
        seeds = tuple(SEED_BASE + start + i for i in range(len(chunk)))
        predicted += classifier.predict(sample(model, SampleSpec(chunk, seeds, steps, guidance))).tolist()
    return accuracy_record(torch.tensor(predicted), labels, steps, guidance)


def accuracy_record(predicted: torch.Tensor, labels, steps: int, guidance: float) -> dict:
    """How often the classifier's ``predicted`` digits are the requested ``labels``, overall and per class."""
    hits = predicted == torch.tensor(labels)
    per = {c: float(hits[torch.tensor(labels) == c].float().mean()) for c in range(10)}
    return {
        "steps": steps,
        "guidance": guidance,
        "images": len(labels),
        "accuracy": float(hits.float().mean()),
        "per_class": per,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 20])
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, classifier = load_builtin_model(), load_classifier()
    for steps in args.steps:
        print(json.dumps(class_accuracy(model, classifier, args.per_class, steps, args.guidance)), flush=True)


if __name__ == "__main__":
    main()
