import pytest
import torch

from reuse_core.steps import StepMatch, match_step

SIGMAS = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])


def test_exact_step_sigmas_map_to_their_index():
    for i, sigma in enumerate(SIGMAS[:-1]):
        assert match_step(sigma.reshape(1), SIGMAS) == StepMatch(i, True)


def test_match_tolerates_float_rounding():
    assert match_step(7.0 * (1 + 5e-5), SIGMAS) == StepMatch(1, True)


def test_intermediate_sigma_belongs_to_the_interval_it_falls_in():
    # e.g. dpm_2 / dpmpp_sde evaluate between two step sigmas
    assert match_step(5.0, SIGMAS) == StepMatch(1, False)
    assert match_step(0.5, SIGMAS) == StepMatch(3, False)


def test_final_sigma_and_out_of_range_values_clamp_to_the_schedule():
    assert match_step(0.0, SIGMAS) == StepMatch(3, False)
    assert match_step(20.0, SIGMAS) == StepMatch(0, False)


def test_partial_schedule_img2img_indexes_steps_actually_run():
    tail = SIGMAS[2:]  # denoise < 1 runs only the tail of the schedule
    assert match_step(3.0, tail) == StepMatch(0, True)
    assert match_step(1.0, tail) == StepMatch(1, True)


def test_schedule_needs_two_values():
    with pytest.raises(ValueError, match="sample_sigmas"):
        match_step(1.0, torch.tensor([1.0]))
