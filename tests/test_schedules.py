import pytest

from reuse_core.schedules import (
    PHAST_RESULTS,
    ReuseSchedule,
    ScheduleSpec,
    StepCoverage,
    hurry,
    parse_bits,
    phast_preset,
    phast_rescaled,
    resample,
    reuse_count,
)

PAPER = "11111111010001000000"


def test_hurry_computes_head_and_reuses_tail():
    assert str(hurry(20, 10)) == "1" * 10 + "0" * 10
    assert str(hurry(5, 0)) == "11111"
    assert hurry(8, 3).reuse_count == 3


@pytest.mark.parametrize("reuse", [-1, 20, 25])
def test_hurry_rejects_reuse_without_compute(reuse):
    with pytest.raises(ValueError, match="reuse_steps"):
        hurry(20, reuse)


def test_phast_preset_is_the_paper_result():
    assert str(phast_preset(20, 10)) == PAPER
    assert phast_preset(10, 3).bits == PHAST_RESULTS[(10, 3)]


def test_phast_rescaling_rule_reproduces_the_paper_swap_and_keeps_reuse_count():
    # The generic rule must give the paper's 20/10 result by itself (it is derived from it).
    assert str(phast_rescaled(20, 10)) == PAPER
    for steps, reuse in [(30, 15), (25, 8), (12, 4), (50, 20)]:
        schedule = phast_preset(steps, reuse)
        assert schedule.steps == steps and schedule.reuse_count == reuse
        assert schedule != hurry(steps, reuse)
    assert str(phast_preset(30, 15)) == "1" * 13 + "01" + "0" * 4 + "1" + "0" * 10


def test_phast_falls_back_to_hurry_where_no_swap_fits():
    assert phast_preset(6, 1) == hurry(6, 1)
    assert phast_preset(4, 2) == hurry(4, 2)
    assert phast_preset(8, 0) == hurry(8, 0)


def test_parse_tolerates_separators():
    assert str(parse_bits("1111 1111, 0100 0100 0000")) == PAPER
    assert str(parse_bits("[1,1,0,1]")) == "1101"


@pytest.mark.parametrize(
    "text, match", [("11x0", "'x' at position 2"), ("", "empty"), ("0111", "start with 1"), ("1 2", "'2'")]
)
def test_parse_errors_name_the_field(text, match):
    with pytest.raises(ValueError, match="custom_schedule") as err:
        parse_bits(text)
    assert match in str(err.value)


def test_huge_custom_schedule_is_refused_before_parsing():
    with pytest.raises(ValueError, match="custom_schedule: 100001 characters is too long") as err:
        ScheduleSpec(strategy="custom", custom_schedule="1" * 100_001)
    assert "resampled" in str(err.value)
    with pytest.raises(ValueError, match="custom_schedule: 100001 characters"):
        parse_bits("1" + " " * 100_000)
    assert parse_bits("10" * 50_000).steps == 100_000  # the limit itself still parses


def test_reuse_count_steps_and_fraction():
    assert reuse_count(20, reuse_steps=10) == 10
    assert reuse_count(20, reuse_fraction=0.5) == 10
    assert reuse_count(8, reuse_steps=3, reuse_fraction=0.25) == 2  # fraction wins when > 0
    assert reuse_count(2, reuse_fraction=0.9) == 1  # always one compute step left
    with pytest.raises(ValueError, match="reuse_steps: 10 reuse steps leave no compute step in this 8-step run"):
        reuse_count(8, reuse_steps=10)
    with pytest.raises(ValueError, match="reuse_fraction"):
        reuse_count(8, reuse_fraction=1.0)


def test_store_steps_only_where_a_reuse_follows():
    schedule = parse_bits(PAPER)
    stores = [i for i, s in enumerate(schedule.store_steps()) if s]
    assert stores == [7, 9, 13]
    assert not any(hurry(10, 0).store_steps())
    assert [i for i, s in enumerate(parse_bits("1101").store_steps()) if s] == [1]
    assert schedule.source_step(12) == 9 and schedule.source_step(19) == 13 and schedule.source_step(5) == 5


def test_schedule_rejects_reuse_at_step_zero():
    with pytest.raises(ValueError, match="step 0"):
        ReuseSchedule((0, 1))


def test_spec_resolves_against_actual_steps():
    spec = ScheduleSpec(strategy="phast", reuse_steps=10)
    assert str(spec.resolve(20).schedule) == PAPER
    assert spec.resolve(30).schedule.reuse_count == 10
    short = spec.resolve(10)  # e.g. KSamplerAdvanced running only 10 steps, or a distilled model
    assert short.schedule.reuse_count == 5 and "reuse_steps 10 leaves no compute step in this 10-step run" in short.note
    assert spec.resolve(1).schedule.reuse_count == 0  # nothing after step 0 (said by nothing_to_reuse)
    frac = ScheduleSpec(strategy="hurry", reuse_fraction=0.5)
    assert str(frac.resolve(8).schedule) == "11110000"
    assert frac.resolve(20).schedule.reuse_count == 10


def test_custom_spec_same_length_used_as_is_other_length_resampled():
    spec = ScheduleSpec(strategy="custom", custom_schedule=PAPER)
    same = spec.resolve(20)
    assert str(same.schedule) == PAPER and same.note == ""
    shorter = spec.resolve(10)
    assert shorter.schedule.steps == 10 and shorter.schedule.bits[0] == 1 and "resampled" in shorter.note
    assert str(shorter.schedule) == str(resample(parse_bits(PAPER), 10))
    assert str(resample(parse_bits("1100"), 8)) == "11110000"


def test_spec_validates_at_construction():
    with pytest.raises(ValueError, match="custom_schedule"):
        ScheduleSpec(strategy="custom", custom_schedule="11a")
    with pytest.raises(ValueError, match="strategy"):
        ScheduleSpec(strategy="fast")
    with pytest.raises(ValueError, match="reuse_fraction"):
        ScheduleSpec(reuse_fraction=1.5)
    with pytest.raises(ValueError, match="reuse_steps"):
        ScheduleSpec(reuse_steps=-1)


def test_nothing_to_reuse_says_why():
    def why(steps, **spec):
        spec = ScheduleSpec(**spec)
        return spec.nothing_to_reuse(spec.resolve(steps))

    assert why(4, strategy="phast", reuse_fraction=0.5) == ""  # 1100
    assert why(4, strategy="phast", reuse_fraction=0.1) == "reuse_fraction 0.1 of 4 steps rounds to 0 reuse steps"
    assert why(6, strategy="hurry", reuse_steps=0) == "reuse_steps is 0 (reuse off)"
    assert why(1, strategy="hurry", reuse_fraction=0.5) == "a 1-step run has no step after its first"
    assert why(4, strategy="custom", custom_schedule="1111") == "custom_schedule has no 0 (reuse) bit"
    assert why(2, strategy="custom", custom_schedule="1101") == (
        "custom_schedule resampled to 2 steps (11) has no 0 (reuse) bit"
    )
    assert why(2, strategy="custom", custom_schedule=PAPER) == ""  # resampled to 10


def test_step_coverage_notices_samplers_with_sigmas_of_their_own():
    from reuse_core.steps import StepMatch

    coverage = StepCoverage(6)
    for match in (StepMatch(0, True), StepMatch(1, False), StepMatch(3, False), None):
        coverage.record(match)
    assert coverage.off_steps and coverage.calls == 4 and coverage.matched == {0}
    assert coverage.note("dpm_fast").startswith("sampler dpm_fast evaluated the model at sigmas of its own")
    coverage.record(StepMatch(2, True))  # heun, dpm_2, ...: the steps are met, with calls between them
    assert not coverage.off_steps and coverage.note("dpm_2") == ""
    assert not StepCoverage(6).off_steps  # no call at all (an outer cache, an interrupted run): nothing to say
    one = StepCoverage(1)
    one.record(StepMatch(0, True))
    assert not one.off_steps
