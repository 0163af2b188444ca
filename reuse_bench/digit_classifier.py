"""A small CNN that checks generated digits are of the requested class (shipped, trained on the same data).

Input: ``[B, 1, 32, 32]`` in [-1, 1] (the built-in model's output range). Weights:
``assets/digit_classifier.safetensors`` with ``digit_classifier.json`` (held-out accuracy, training record),
written by ``python -m reuse_bench.train_classifier``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .builtin_model import ASSETS

WEIGHTS_PATH = ASSETS / "digit_classifier.safetensors"
RECORD_PATH = ASSETS / "digit_classifier.json"


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(64 * 16, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class per image; ``images`` in [-1, 1], clamped first (samples may overshoot)."""
        return self(images.clamp(-1, 1)).argmax(dim=1)


def load_classifier(weights: Path | str = WEIGHTS_PATH) -> DigitClassifier:
    from safetensors.torch import load_file

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"digit classifier weights not found at {weights}; re-create them with "
            "`python -m reuse_bench.train_classifier`"
        )
    model = DigitClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    return model.eval().requires_grad_(False)


def held_out_accuracy(record: Path | str = RECORD_PATH) -> float | None:
    record = Path(record)
    return json.loads(record.read_text()).get("held_out_accuracy") if record.is_file() else None
