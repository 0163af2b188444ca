"""The few-step table (``python -m reuse_bench.few_steps``) in miniature: its rows are the nodes' presets resolved as
the nodes resolve them, and a 3-step measurement on the built-in DiT scores them against the plain sampler."""

from __future__ import annotations

import math

import pytest
from comfy_harness import NOT_IN_THIS_ENVIRONMENT

pytest.importorskip("diffusers", reason=f"diffusers {NOT_IN_THIS_ENVIRONMENT}")

from reuse_bench import few_steps as fs
from reuse_bench.builtin_dit import load_builtin_dit


def test_rows_are_the_node_presets_for_the_run():
    rows = {(r.node, r.setting): r for r in fs.rows_for(4, forecast=False)}
    assert [r.plain_steps for r in rows.values() if r.node == "plain Euler"] == [3, 2]
    assert rows["Encoder Feature Propagation", "paper"].plan == "0,1,2"  # a quarter of a short run decoder-only
    assert rows["Encoder Feature Propagation", "uniform k=4 (node default k)"].plan == "0"
    default = rows["Attention Map Reuse", "phast, reuse_steps 10 (node default)"]
    assert default.plan == "1100" and not default.refused  # 10 >= 4 steps: half the run, as 10 of 20
    assert rows["Attention Map Reuse", "phast, reuse_fraction 0.5"].plan == "1100"
    assert not any("forecast" in setting for _, setting in rows)


@pytest.mark.slow  # about 20 s
def test_three_step_table():
    results = fs.measure(load_builtin_dit(), 3, labels=(0, 7))
    by_setting = {r.row.setting: r for r in results}
    assert by_setting["2 steps"].flops_ratio == pytest.approx(2 / 3, rel=1e-6)
    assert math.isfinite(by_setting["2 steps"].psnr_mean)
    paper = by_setting["paper"]  # keeps every step of a 3-step run: the reference itself
    assert paper.psnr_mean == math.inf and paper.flops_ratio == pytest.approx(1.0) and paper.vs_plain == ""
    one_pass = by_setting["one_pass"]
    assert one_pass.skipped == "2/3 calls" and one_pass.flops_ratio < 0.7 and "Euler" in one_pass.vs_plain
    text = fs.table({3: results})
    assert text.count("\n| 3 |") == len(results) and "identical" in text
