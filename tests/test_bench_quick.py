"""The main job's ``--quick`` run, end to end, as CI runs it: outputs exist and the table has every row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_harness import NOT_IN_THIS_ENVIRONMENT

pytest.importorskip("diffusers", reason=f"diffusers {NOT_IN_THIS_ENVIRONMENT}")
pytest.importorskip("DeepCache", reason=f"DeepCache {NOT_IN_THIS_ENVIRONMENT}")
pytest.importorskip("matplotlib", reason=f"matplotlib {NOT_IN_THIS_ENVIRONMENT}")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # one full --quick run of the main job, 2-3 minutes on 2 cores


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quick")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "reuse_bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_quick_run_writes_every_output(quick_run):
    out, proc = quick_run
    for name in ("results.md", "results.json", "grid.png", "psnr_vs_speed.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "| Method |" in proc.stdout  # the table is printed too


def test_quick_table_has_the_expected_rows(quick_run):
    from reuse_bench.bench import build_dit_methods, build_methods
    from reuse_bench.phast_search import load_stored

    out, _ = quick_run
    result = json.loads((out / "results.json").read_text())
    calibrated = result["calibrated"]
    unet = [(m.name, m.steps) for m in build_methods(load_stored(), calibrated["U-Net"], quick=True)]
    dit = [(m.name, m.steps) for m in build_dit_methods(calibrated["DiT"], quick=True)]
    assert [(r["method"], r["steps"]) for r in result["rows"]] == unet + dit
    assert [r["model"] for r in result["rows"]] == ["U-Net"] * len(unet) + ["DiT"] * len(dit)
    assert all(name.startswith("DiT: ") for name, _ in dit)  # labelled per model in the one table
    families = {r["family"] for r in result["rows"]}
    assert families == {"reference", "attention", "encoder", "both", "peer"}
    assert {r["family"] for r in result["rows"] if r["model"] == "DiT"} == {"reference", "attention", "encoder", "peer"}
    table = (out / "results.md").read_text()
    for name, _ in unet + dit:
        assert f"| {name} |" in table


def test_calibrated_rows_have_the_presets_budgets(quick_run):
    from reuse_bench.bench import ATTENTION_REUSE, DIT_ATTENTION_REUSE

    out, _ = quick_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    for model, reuse in (("U-Net", ATTENTION_REUSE), ("DiT", DIT_ATTENTION_REUSE)):
        paper = next(r for r in rows if r["model"] == model and r["family"] == "encoder" and "paper" in r["method"])
        mine = [r for r in rows if r["model"] == model and "calibrated" in r["method"] and r["family"] != "peer"]
        # fitted once for reuse and once for a linear forecast's error, each run with its forecast
        assert sorted((r["family"], r["settings"]["forecast"]) for r in mine) == [
            ("attention", "linear"), ("attention", "reuse"), ("encoder", "linear"), ("encoder", "reuse")
        ], model  # fmt: skip
        for row in mine:
            if row["family"] == "encoder":
                assert len(row["settings"]["key_steps"]) == len(paper["settings"]["key_steps"]), model
                assert row["settings"]["key_steps"] != paper["settings"]["key_steps"], model
            else:
                assert row["settings"]["schedule"].count("0") == reuse, model


def test_every_forecast_row_has_its_reuse_twin_and_the_fewer_steps_curve_is_kept(quick_run):
    from reuse_bench.report import forecast_gains

    out, _ = quick_run
    result = json.loads((out / "results.json").read_text())
    forecast = [r for r in result["rows"] if r["settings"].get("forecast", "reuse") != "reuse"]
    assert forecast and len(forecast_gains(result["rows"])) == len(forecast)
    assert "Forecast linear against reuse at the same schedule" in (out / "results.md").read_text()
    for model in ("U-Net", "DiT"):
        curve = result["fewer_steps"][model]
        assert curve and all(len(points) > 1 for points in curve.values()), model


def test_quick_numbers_are_consistent(quick_run):
    out, _ = quick_run
    rows = json.loads((out / "results.json").read_text())["rows"]
    for row in rows:
        if row["family"] == "reference":
            assert row["time_ratio"] == 1.0 and row["flops_ratio"] == 1.0
            assert row["psnr_mean"] == "inf" and row["ssim_mean"] == 1.0
        else:
            assert row["flops"] > 0 and row["peak_tensor_bytes"] > 0 and row["equal_time_ddim_steps"] >= 1
            if row["equal_time_ddim_steps"] < row["steps"]:  # the best plain step count that fits in the time
                assert 1 <= row["equal_time_best_steps"] <= row["equal_time_ddim_steps"], row["method"]
            assert row["work_skipped"], row["method"]
        assert 0.0 <= row["classifier_accuracy"] <= 1.0
    # Skipping encoder/deep blocks must remove model FLOPs (First Block Cache on the DiT decides per step from the
    # model's residuals, so it may skip nothing on the one-image instrumented run).
    saving = [r for r in rows if r["family"] == "encoder" or (r["family"] == "peer" and r["model"] == "U-Net")]
    assert all(r["flops_ratio"] < 1.0 for r in saving)


def test_grid_has_one_row_per_method_and_one_column_per_seed(quick_run):
    from PIL import Image

    out, _ = quick_run
    result = json.loads((out / "results.json").read_text())
    width, height = Image.open(out / "grid.png").size
    cell = 2 * 32
    assert height >= len(result["rows"]) * cell
    assert width >= len(result["settings"]["seeds"]) * cell


def test_comfyui_mode_rejects_a_folder_that_is_not_comfyui(tmp_path):
    from reuse_bench.__main__ import main

    with pytest.raises(SystemExit, match="not a ComfyUI checkout"):
        main(["--comfyui", str(tmp_path), "--out", str(tmp_path / "out")])


def test_comfy_tables_split_by_table_key(tmp_path):
    from reuse_bench.comfy_report import write_comfy_tables

    rows = [{"table": "unet", "size": 64, "ratio": 0.5}, {"table": "end_to_end", "preset": "paper", "speedup": 1.25}]
    paths = write_comfy_tables({"Encoder": rows}, tmp_path, quick=True, comfyui=tmp_path)
    text = paths["table"].read_text()
    assert "## Encoder (unet)" in text and "## Encoder (end_to_end)" in text
    assert "| 64 | 0.5 |" in text and "| paper | 1.25 |" in text
    assert json.loads(paths["json"].read_text())["tables"]["Encoder"][1]["speedup"] == 1.25
