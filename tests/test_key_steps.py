"""Key-step schedules, reuse windows and parallel-decoding groups (pure functions, no ComfyUI)."""

import pytest

from reuse_core.key_steps import (
    PAPER_DENSE_PREFIX,
    PAPER_KEY_STEPS_50,
    PAPER_REFERENCE_STEPS,
    KeyStepSpec,
    group_non_key_steps,
    make_plan,
    one_pass_key_steps,
    paper_key_steps,
    parse_key_step_list,
    reuse_window,
    reuse_window_by_position,
    uniform_key_steps,
)


def test_paper_preset_is_the_papers_set_at_50_steps():
    assert paper_key_steps(50) == PAPER_KEY_STEPS_50 == (0, 1, 2, 3, 5, 10, 15, 25, 35)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (1, (0,)),
        (2, (0, 1)),
        (3, (0, 1, 2)),
        (4, (0, 1, 2)),
        (5, (0, 1, 2, 3)),
        (6, (0, 1, 2, 3, 4)),
        (8, (0, 1, 2, 3, 4, 6)),
        (10, (0, 1, 2, 3, 5, 7)),
        (20, (0, 1, 2, 3, 4, 6, 10, 14)),
        (25, (0, 1, 2, 3, 5, 8, 13, 18)),
        (100, (0, 1, 2, 3, 4, 6, 10, 20, 30, 50, 70)),
    ],
)
def test_paper_preset_scaling_rule(steps, expected):
    assert paper_key_steps(steps) == expected


@pytest.mark.parametrize("steps", range(1, 121))
def test_paper_preset_invariants(steps):
    keys = paper_key_steps(steps)
    assert keys == tuple(sorted(set(keys)))
    assert all(0 <= k < steps for k in keys)
    assert steps - len(keys) >= steps // 4  # a quarter of the steps, rounded down, decoder-only
    assert set(range(min(4, steps - steps // 4))) <= set(keys)  # dense early keys kept where there is room


def _paper_without_the_short_run_cap(steps):
    scaled = {int(k * steps / PAPER_REFERENCE_STEPS + 0.5) for k in PAPER_KEY_STEPS_50}
    return tuple(sorted(s for s in scaled | set(range(min(PAPER_DENSE_PREFIX, steps))) if s < steps))


def test_short_run_rule_changes_only_4_and_5_steps():
    # The cap on key steps binds where the scaling leaves every step a key step; 6 steps on are as before.
    changed = [n for n in range(1, 3001) if paper_key_steps(n) != _paper_without_the_short_run_cap(n)]
    assert changed == [4, 5]


def test_nothing_to_reuse_says_why():
    assert KeyStepSpec("paper").nothing_to_reuse(3) == "paper keeps steps 0-2 (runs of under 4 steps keep every step)"
    assert KeyStepSpec("paper").nothing_to_reuse(4) == ""  # {0, 1, 2}: step 3 decoder-only
    assert KeyStepSpec("uniform", k=1).nothing_to_reuse(6) == "uniform k=1 makes every step a key step"
    assert KeyStepSpec("uniform", k=4).nothing_to_reuse(2) == ""
    assert KeyStepSpec("custom", custom=(0, 1, 2, 3, 9)).nothing_to_reuse(4) == (
        "custom_key_steps list every step of the run (steps 0-3)"
    )
    assert KeyStepSpec("one_pass").nothing_to_reuse(2) == ""
    assert KeyStepSpec("adaptive", threshold=0.3).nothing_to_reuse(2) == ""  # decided while sampling
    for spec in (KeyStepSpec("one_pass"), KeyStepSpec("adaptive"), KeyStepSpec("paper")):
        assert spec.nothing_to_reuse(1) == "a 1-step run has no step after its first"


def test_custom_entries_beyond_the_run():
    spec = KeyStepSpec.from_inputs("custom", 4, "111100")  # an attention schedule pasted by mistake
    assert spec.beyond(6) == (111100,) and spec.key_steps(6) == (0,)
    assert KeyStepSpec.from_inputs("custom", 4, "0,1,2,3,5,10,15,25,35").beyond(20) == (25, 35)
    assert KeyStepSpec("paper").beyond(2) == ()


def test_uniform_and_one_pass():
    assert uniform_key_steps(10, 4) == (0, 4, 8)
    assert uniform_key_steps(5, 1) == (0, 1, 2, 3, 4)
    assert uniform_key_steps(3, 10) == (0,)
    assert one_pass_key_steps(4) == (0,)
    with pytest.raises(ValueError, match="uniform_k"):
        uniform_key_steps(10, 0)


def test_parse_custom_list():
    assert parse_key_step_list("0,1,2,5,10") == (0, 1, 2, 5, 10)
    assert parse_key_step_list(" 10 5; 0,,2 [1] ") == (0, 1, 2, 5, 10)
    for bad in ("", "  ", "0,a", "0,-1", "1.5"):
        with pytest.raises(ValueError, match="custom_key_steps"):
            parse_key_step_list(bad)


def test_huge_custom_input_gets_a_clear_error_naming_the_field():
    # More digits than int() converts (4300) once gave Python's own error without the field name.
    with pytest.raises(ValueError, match="custom_key_steps: step index '111111111111…' \\(5000 digits\\)") as err:
        parse_key_step_list("0,1," + "1" * 5000)
    assert "below the sampler's steps" in str(err.value)
    with pytest.raises(ValueError, match="custom_key_steps"):
        KeyStepSpec.from_inputs("custom", 4, "0," + "9" * 10)
    with pytest.raises(ValueError, match="custom_key_steps: 100001 characters is too long"):
        parse_key_step_list("0" + " " * 100_000)
    with pytest.raises(ValueError, match="custom_key_steps: 'x00000000000…' is not") as err:
        parse_key_step_list("x" + "0" * 10_000)
    assert len(str(err.value)) < 200  # the message quotes the bad entry, not all of it
    # Leading zeros do not count, and large indices that fit still parse (they are ignored by shorter runs).
    assert parse_key_step_list("0" * 5000 + "5," + "9" * 9) == (5, 999_999_999)


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="key_steps"):
        KeyStepSpec("fastest")
    with pytest.raises(ValueError, match="uniform_k"):
        KeyStepSpec("uniform", k=0)
    with pytest.raises(ValueError, match="custom_key_steps"):
        KeyStepSpec.from_inputs("custom", 4, "0, two")
    # The custom text is not parsed (so cannot fail) when another preset is selected.
    assert KeyStepSpec.from_inputs("paper", 4, "garbage").key_steps(50) == PAPER_KEY_STEPS_50


def test_custom_resolution_always_keeps_step_zero_and_drops_out_of_range():
    spec = KeyStepSpec.from_inputs("custom", 4, "2,5,10,40")
    assert spec.key_steps(20) == (0, 2, 5, 10)
    assert spec.key_steps(3) == (0, 2)


def test_reuse_windows():
    sigmas = [10.0, 5.0, 2.0, 1.0]
    assert reuse_window(sigmas, start_sigma=5.0, end_sigma=1.0) == (False, True, True, False)
    assert reuse_window(sigmas, start_sigma=1e9, end_sigma=0.0) == (True, True, True, True)
    assert reuse_window_by_position(4, 0.25, 0.75) == (False, True, True, False)


def test_grouping_respects_max_batch_and_key_steps():
    assert group_non_key_steps(10, {0, 4}, 2) == ((1, 2), (3,), (5, 6), (7, 8), (9,))
    assert group_non_key_steps(4, {0, 1, 2, 3}, 4) == ()
    with pytest.raises(ValueError, match="max_decoders_per_batch"):
        group_non_key_steps(10, {0}, 0)


def test_paper_groups_match_the_papers_group_sizes():
    plan = make_plan(KeyStepSpec("paper"), 50, max_batch=64)
    # Paper (key step included): 1, 1, 1, 2, 5, 5, 10, 10, 15.
    assert [len(b) for b in plan.decode_batches] == [1, 4, 4, 9, 9, 14]
    assert plan.decoder_only_steps == 41


def test_plan_with_window_and_batches():
    window = [True] * 6 + [False] * 2
    plan = make_plan(KeyStepSpec("one_pass"), 8, window=window, max_batch=3)
    assert plan.full_steps == frozenset({0, 6, 7})
    assert plan.decode_batches == ((1, 2, 3), (4, 5))
    assert plan.batch_from(1) == (1, 2, 3)
    assert plan.batch_from(2) == (2, 3)
    assert plan.batch_from(6) == (6,)
    assert plan.is_full(8) and plan.is_full(-1) and not plan.is_full(3)
    with pytest.raises(ValueError, match="window"):
        make_plan(KeyStepSpec("paper"), 8, window=[True] * 3)
