"""The shipped model and classifier load with safetensors, sample deterministically, and draw the asked digits."""

from __future__ import annotations

import json

import pytest
import torch
from comfy_harness import NOT_IN_THIS_ENVIRONMENT

pytest.importorskip("diffusers", reason=f"diffusers {NOT_IN_THIS_ENVIRONMENT}")

from reuse_bench import builtin_model as bm
from reuse_bench.digit_classifier import RECORD_PATH, load_classifier
from reuse_bench.sampling import SampleSpec, initial_noise, sample


@pytest.fixture(scope="module")
def model():
    return bm.load_builtin_model()


def test_weights_are_small_and_match_the_config(model):
    assert bm.WEIGHTS_PATH.stat().st_size < 8 * 2**20
    record = json.loads(bm.CONFIG_PATH.read_text())
    assert record["unet_config"] == bm.UNET_CONFIG
    assert record["scheduler_config"] == bm.SCHEDULER_CONFIG
    assert record["training"]["steps"] > 0 and record["training"]["seed"] == 0
    assert (
        sum(p.numel() for p in model.unet.parameters()) + model.class_tokens.table.weight.numel()
        == record["parameters"]
    )
    assert not model.unet.training


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_mnist"):
        bm.load_builtin_model(tmp_path / "absent.safetensors")


def test_context_tokens_per_class(model):
    ctx = model.context(torch.tensor([0, 9, bm.NULL_CLASS]))
    assert ctx.shape == (3, bm.TOKENS_PER_CLASS, bm.CONTEXT_DIM)
    assert not torch.equal(ctx[0], ctx[1]) and not torch.equal(ctx[1], ctx[2])


def test_sampling_is_deterministic_per_seed(model):
    spec = SampleSpec(labels=(1, 7), seeds=(5, 6), steps=4)
    first, second = sample(model, spec), sample(model, spec)
    assert torch.equal(first, second)
    alone = sample(model, SampleSpec(labels=(7,), seeds=(6,), steps=4))
    torch.testing.assert_close(alone[0], first[1], rtol=1e-5, atol=1e-5)  # a seed's image does not depend on its batch
    assert not torch.equal(first[0], first[1])
    assert torch.equal(initial_noise([3])[0], initial_noise([1, 3])[1])


def test_full_compute_samples_are_the_requested_digits(model):
    """The shipped classifier agrees with the requested class for most full-compute DDIM samples."""
    labels = tuple(range(10))
    images = sample(model, SampleSpec(labels=labels, seeds=tuple(range(100, 110)), steps=20))
    assert images.shape == (10, 1, 32, 32) and torch.isfinite(images).all()
    predicted = load_classifier().predict(images)
    accuracy = (predicted == torch.tensor(labels)).float().mean().item()
    assert accuracy >= 0.7, f"classifier agreed on {accuracy:.0%} of samples: {predicted.tolist()}"


def test_classifier_record_reports_held_out_accuracy():
    record = json.loads(RECORD_PATH.read_text())
    assert record["held_out_images"] == 500
    assert record["held_out_accuracy"] > 0.9
