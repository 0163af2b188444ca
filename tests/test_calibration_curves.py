"""The calibration curves (``python -m reuse_bench.calibration_curves``) on both built-in models, in miniature: every
setting runs what it says (calibrated key steps and schedules have their budget), costs are consistent, and the
gains are measured against the same model's fewer-steps curve."""

from __future__ import annotations

import math

import pytest
from comfy_harness import NOT_IN_THIS_ENVIRONMENT

pytest.importorskip("diffusers", reason=f"diffusers {NOT_IN_THIS_ENVIRONMENT}")

from reuse_bench import calibration_curves as cc

pytestmark = pytest.mark.slow  # about 40 s

STEPS = 8  # Encoder Feature Propagation's reference
ATTENTION_STEPS = 20  # PHAST's searched setting, 20 steps / 10 reused, compared at this count only
SETTINGS = cc.CurveSettings(
    quick=True, labels=(0, 7), seeds=(0, 1), encoder_steps=STEPS, attention_steps=ATTENTION_STEPS,
    key_budgets=(3,), thresholds=(0.5,), reuse_counts=(3,),
)  # fmt: skip


@pytest.fixture(scope="module")
def subjects():
    dit = cc.dit_subject(len(SETTINGS.labels))
    assert not isinstance(dit, str), dit
    return [cc.unet_subject(len(SETTINGS.labels)), dit]


@pytest.fixture(scope="module")
def curves(subjects):
    return cc.run_curves(subjects, SETTINGS, log=lambda _: None)


def test_equal_cost_baseline_is_the_upper_envelope_of_fewer_steps():
    measured = [(0.5, 20.0), (0.6, 30.0), (0.7, 25.0), (0.8, 40.0), (1.0, math.inf)]  # (cost, PSNR) per step count
    curve = [cc.Point("m", "fewer steps", "fewer", str(k), cost, psnr, 0.0) for k, (cost, psnr) in enumerate(measured)]
    assert cc.equal_cost_psnr(curve, 0.55) == pytest.approx(25.0)
    assert cc.equal_cost_psnr(curve, 0.65) == pytest.approx(30.0)  # not 27.5: 0.7 is worse than the cheaper 0.6
    assert cc.equal_cost_psnr(curve, 0.75) == pytest.approx(35.0)
    assert cc.equal_cost_psnr(curve, 0.4) is None and cc.equal_cost_psnr(curve, 0.9) is None


def test_step_flops_order_the_kinds_of_step(subjects):
    for subject in subjects:
        f = subject.flops
        assert 0 < f["decoder"] < f["full"], subject.name
        assert 0 < f["reuse_output"] < f["full"], subject.name


def test_recorded_drift_is_a_square_matrix_per_quantity(subjects):
    for subject in subjects:
        drift = cc.record_drift(subject, STEPS)
        assert len(drift["weights"]) == STEPS and all(w >= 0 for w in drift["weights"])
        assert all(t.steps == STEPS and t.elements > 0 for t in drift["trajectories"].values()), subject.name
        for name in ("encoder", "map", "output"):
            matrix = drift[name]
            assert len(matrix) == STEPS and all(len(row) == STEPS for row in matrix), (subject.name, name)
            assert all(matrix[i][i] == 0 for i in range(STEPS))
            assert matrix[0][STEPS - 1] > 0, f"{subject.name}: {name} recorded no change over the run"


def test_settings_run_their_budget_and_cost(curves):
    for model in ("U-Net", "DiT"):
        points = {p.label: p for p in curves.points if p.model == model}
        calibrated = points["calibrated 3 keys"]
        assert len(calibrated.detail["key_steps"]) == 3 and calibrated.detail["key_steps"][0] == 0
        assert points["calibrated r=3"].detail["schedule"].count("0") == 3
        assert points["HURRY r=3"].detail["schedule"] == "1" * (ATTENTION_STEPS - 3) + "0" * 3
        assert points["calibrated r=10 (map)"].detail["schedule"].count("0") == 10
        fitted = points["calibrated 3 keys, forecast linear"]  # fitted to a linear forecast's error, run with it
        assert len(fitted.detail["key_steps"]) == 3 and fitted.detail["forecast"] == "linear"
        assert points["calibrated r=3, forecast linear"].detail["schedule"].count("0") == 3
        assert points["HURRY r=3, forecast linear"].flops_ratio == points["HURRY r=3"].flops_ratio
        for p in points.values():
            assert 0 < p.flops_ratio < 1 and math.isfinite(p.psnr), (model, p.label)
        # fewer key steps cost less; the same number of reused steps costs the same whichever steps they are
        assert calibrated.flops_ratio < points["uniform k=2"].flops_ratio
        assert points["calibrated r=3"].flops_ratio == points["HURRY r=3"].flops_ratio


def test_fewer_steps_curve_and_gains_per_model(curves):
    for model in ("U-Net", "DiT"):
        for steps in (STEPS, ATTENTION_STEPS):
            curve = curves.fewer[model, steps]
            assert [p.flops_ratio for p in curve] == [k / steps for k in range(max(2, steps // 4), steps + 1)]
            assert curve[-1].psnr == math.inf and all(math.isfinite(p.psnr) for p in curve[:-1])
        rows = [r for r in curves.best_gain if r["model"] == model]
        assert {(r["method"], r["kind"]) for r in rows} >= {("encoder", "calibrated"), ("encoder", "preset")}
        for row in rows:
            point = next(p for p in curves.points if p.model == model and p.label == row["best"])
            steps = STEPS if row["method"] == "encoder" else ATTENTION_STEPS
            assert row["gain_db"] == pytest.approx(point.psnr - cc.equal_cost_psnr(curves.fewer[model, steps],
                                                                                    point.flops_ratio))  # fmt: skip


def test_phast_search_comparison_on_the_unet_only(curves):
    # The stored search (assets/phast_schedules.json) is the U-Net's; the DiT has no search to compare with.
    assert {(row["model"], row["mode"]) for row in curves.vs_phast} == {("U-Net", "map"), ("U-Net", "output")}
    for row in curves.vs_phast:
        assert row["calibrated_runs"] == 1 and row["phast_runs"] > 100
        assert row["calibrated_schedule"].count("0") == row["phast_schedule"].count("0") == 10
