"""reuse_core.metrics on inputs whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from comfy_harness import NOT_IN_THIS_ENVIRONMENT

from reuse_core.metrics import psnr, ssim


def image(seed=0, shape=(1, 1, 32, 32)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_psnr_of_identical_images_is_inf():
    x = image()
    assert psnr(x, x.clone(), data_range=1.0) == math.inf


@pytest.mark.parametrize("offset", [0.1, 0.01])
def test_psnr_of_a_known_error_is_the_known_value(offset):
    x = image()
    # MSE = offset^2, so PSNR = 10 log10(1 / offset^2) = -20 log10(offset): 20 dB and 40 dB.
    assert psnr(x + offset, x, data_range=1.0) == pytest.approx(-20 * math.log10(offset), abs=1e-9)


def test_psnr_of_gaussian_noise_matches_its_sigma():
    x = image(shape=(4, 1, 256, 256))
    sigma = 0.05
    noisy = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert psnr(noisy, x, data_range=1.0) == pytest.approx(-20 * math.log10(sigma), abs=0.05)  # 26.02 dB


def test_psnr_scales_with_data_range():
    x = image()
    assert psnr(255 * (x + 0.1), 255 * x, data_range=255.0) == pytest.approx(20.0, abs=1e-9)


def test_psnr_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(image(shape=(1, 1, 8, 8)), image(shape=(1, 1, 8, 9)))


def test_ssim_of_identical_images_is_one():
    x = image()
    assert ssim(x, x.clone(), data_range=1.0) == pytest.approx(1.0, abs=1e-12)


def test_ssim_falls_with_noise_and_is_symmetric():
    x = image(shape=(1, 1, 64, 64))
    gen = torch.Generator().manual_seed(2)
    light = (x + 0.02 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    heavy = (x + 0.3 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    s_light, s_heavy = ssim(light, x), ssim(heavy, x)
    assert 1.0 > s_light > s_heavy > -1.0
    assert ssim(x, light) == pytest.approx(s_light, abs=1e-12)


def test_ssim_of_a_constant_shift_only_loses_luminance_term():
    # A flat image against a shifted flat image: SSIM = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1).
    x = torch.full((1, 1, 16, 16), 0.4, dtype=torch.float64)
    y = torch.full((1, 1, 16, 16), 0.6, dtype=torch.float64)
    c1 = 0.01**2
    expected = (2 * 0.4 * 0.6 + c1) / (0.4**2 + 0.6**2 + c1)
    assert ssim(x, y, data_range=1.0) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("distortion", ["noise", "shift", "darken", "grey_noise"])
def test_ssim_matches_scikit_image_on_real_photographs(distortion):
    """Our SSIM against scikit-image's (Gaussian 11x11, sigma 1.5, population covariance: Wang et al. 2004)."""
    np = pytest.importorskip("numpy")
    skimage = pytest.importorskip("skimage", reason=f"skimage {NOT_IN_THIS_ENVIRONMENT}")
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    photograph = skimage.data.camera() if distortion == "grey_noise" else skimage.data.astronaut()
    reference = photograph[100:356, 100:356] / 255.0  # a 256x256 crop keeps the test fast
    image = {
        "noise": lambda r: np.clip(r + rng.normal(0, 0.1, r.shape), 0, 1),
        "shift": lambda r: np.roll(r, 3, axis=1),
        "darken": lambda r: r * 0.6,
        "grey_noise": lambda r: np.clip(r + rng.normal(0, 0.05, r.shape), 0, 1),
    }[distortion](reference)
    channel_axis = None if reference.ndim == 2 else 2
    theirs = structural_similarity(
        image, reference, data_range=1.0, channel_axis=channel_axis, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False,
    )  # fmt: skip

    def as_batch(a):
        t = torch.from_numpy(a)
        return t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]

    assert ssim(as_batch(image), as_batch(reference), data_range=1.0) == pytest.approx(theirs, abs=1e-9)
