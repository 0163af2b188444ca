"""Prior noise injection rule and the injecting Euler/DDIM sampler (pure torch, no ComfyUI)."""

import math

import pytest
import torch

from reuse_core.noise_injection import (
    PriorNoiseInjection,
    initial_noise_vp,
    sample_euler_prior_noise,
    ve_scale,
)


def toy_denoiser(x, sigma, **_):
    """A nonlinear stand-in for a model: denoised = f(x, sigma)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x / torch.sqrt(1 + s**2)) * 0.8 + 0.05 * x.roll(1, dims=-1) / (1 + s)


def toy_timestep(sigma) -> float:
    # Monotone sigma -> 0..1000 map (like a discrete schedule's timestep()).
    s = float(sigma)
    return 1000.0 * s / (s + 1.0)


SIGMAS = torch.tensor([14.6, 6.0, 3.0, 1.6, 0.9, 0.5, 0.25, 0.1, 0.0])


def paper_ddim_loop(x_start, sigmas, injection, model):
    """The paper's DDIM loop with injection, written in the variance-preserving parametrisation."""

    def abar(s):
        return 1.0 / (1.0 + float(s) ** 2)

    z = x_start * math.sqrt(abar(sigmas[0]))
    z_T = z.clone()
    for i in range(len(sigmas) - 1):
        t = toy_timestep(sigmas[i])
        z = injection.inject_vp(z, z_T, t)
        x = z / math.sqrt(abar(sigmas[i]))
        denoised = model(x, sigmas[i] * torch.ones(x.shape[0]))
        eps = (x - denoised) / float(sigmas[i])
        a_next = abar(sigmas[i + 1])
        z = math.sqrt(a_next) * denoised + math.sqrt(1 - a_next) * eps
    return z / math.sqrt(abar(sigmas[-1]))


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="noise_alpha"):
        PriorNoiseInjection(alpha=-0.1)
    with pytest.raises(ValueError, match="noise_alpha"):
        PriorNoiseInjection(alpha=float("nan"))
    with pytest.raises(ValueError, match="noise_tau"):
        PriorNoiseInjection(alpha=0.003, tau=1500)


def test_rule_applies_below_tau_only():
    rule = PriorNoiseInjection(alpha=0.003, tau=500)
    assert rule.applies(499.0) and not rule.applies(500.0) and not rule.applies(981.0)
    assert not PriorNoiseInjection(alpha=0.0).applies(10.0)
    z, z_T = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(rule.inject_vp(z, z_T, 100.0), z + 0.006)
    assert torch.equal(rule.inject_vp(z, z_T, 900.0), z)


def test_ve_form_is_the_vp_rule_in_k_diffusion_units():
    rule = PriorNoiseInjection(alpha=0.01, tau=500)
    gen = torch.Generator().manual_seed(0)
    x, z_T = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    sigma = 0.7
    via_vp = rule.inject_vp(x / ve_scale(sigma), z_T, 100.0) * ve_scale(sigma)
    torch.testing.assert_close(rule.inject_ve(x, sigma, z_T, 100.0), via_vp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(initial_noise_vp(x * ve_scale(3.0), 3.0), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.003, 0.05])
def test_euler_with_injection_equals_the_papers_ddim_loop(alpha):
    injection = PriorNoiseInjection(alpha=alpha, tau=500)
    gen = torch.Generator().manual_seed(1)
    x_start = torch.randn(2, 4, 8, 8, generator=gen) * ve_scale(SIGMAS[0])
    ours = sample_euler_prior_noise(
        toy_denoiser, x_start.clone(), SIGMAS, injection=injection, timestep_of=toy_timestep
    )
    reference = paper_ddim_loop(x_start.clone(), SIGMAS, injection, toy_denoiser)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_injection_changes_the_result_only_when_it_applies():
    gen = torch.Generator().manual_seed(2)
    x_start = torch.randn(1, 4, 8, 8, generator=gen) * ve_scale(SIGMAS[0])

    def run(alpha, tau):
        return sample_euler_prior_noise(
            toy_denoiser, x_start.clone(), SIGMAS, injection=PriorNoiseInjection(alpha, tau), timestep_of=toy_timestep
        )

    off = run(0.0, 500)
    assert torch.equal(run(0.003, 0.0), off)  # tau = 0: no step has t < 0
    on = run(0.003, 500)
    assert not torch.equal(on, off)
    assert torch.isfinite(on).all()


def test_callback_sees_every_step():
    seen = []
    sample_euler_prior_noise(
        toy_denoiser,
        torch.randn(1, 4, 4, 4) * 15,
        SIGMAS,
        callback=lambda d: seen.append(d["i"]),
        injection=PriorNoiseInjection(0.003),
        timestep_of=toy_timestep,
    )
    assert seen == list(range(len(SIGMAS) - 1))
