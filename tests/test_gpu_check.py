"""The GPU check (``reuse_bench.gpu_check``) at its ``--tiny`` sizes on the CPU, against real ComfyUI in process.

One run of the command line, all four families (SD1.5, SDXL, Flux, Wan at tiny widths): the JSON and the Markdown
table are written, every model has every variant with finite positive times and speed-ups, every kind of step was
timed, and both nodes really reused work, by their own stats (``run_records``) as well as by the summary lines the
check parses.
"""

import json
import math

import pytest
from run_records import ATTENTION, ENCODER

from reuse_bench import gpu_check

STEP_KINDS = ("full_step_s", "key_step_s", "decoder_only_step_s", "attention_compute_step_s", "attention_reuse_step_s")


def positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def nodes(comfy):
    """The pack's node modules, imported before ``runs`` starts recording (it wraps the run classes loaded then)."""
    return gpu_check.pack_nodes()


# ComfyUI is already imported here, by the `comfy` fixture, with its CPU attention default: the check says so.
@pytest.mark.filterwarnings("ignore:ComfyUI was imported before")
def test_tiny_gpu_check_covers_every_model_and_reuses(nodes, runs, tmp_path):
    gpu_check.main(["--tiny", "--out", str(tmp_path)])

    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    table = (tmp_path / "gpu_check.md").read_text()
    assert doc["settings"]["tiny"] and doc["environment"]["device"] == "cpu"
    assert [m["key"] for m in doc["models"]] == list(gpu_check.MODELS)
    names = [v.name for v in gpu_check.VARIANTS]
    for model in doc["models"]:
        assert model["status"] == "done", model
        assert model["rounds"] == 1 and model["params"] > 0
        assert model["model"] in table
        rows = {row["variant"]: row for row in model["variants"]}
        assert list(rows) == names
        for name, row in rows.items():
            assert "error" not in row, (model["key"], row)
            assert positive(row["wall_s"]) and positive(row["speedup"]), (model["key"], row)
            assert row["finite"], (model["key"], name)
            assert f"| {name} | {row['settings']} |" in table
        assert rows["baseline"]["speedup"] == 1.0 and rows["baseline"]["reuse"] == {}
        kinds = model["step_kinds"]
        assert all(positive(kinds[k]) for k in STEP_KINDS), kinds
        assert 0 < kinds["encoder_share"] < 1, kinds

        # what the nodes reported: EFP saved encoder passes, AMR reused attention at the PHAST schedule's 0 steps
        steps = model["steps"]
        for name in ("EFP defaults", "EFP uniform k=4", "EFP uniform k=4 seq", "AMR output + EFP defaults"):
            reuse = rows[name]["reuse"]
            assert reuse["encoder_passes_saved"] == steps - len(reuse["key_steps"]) > 0, (model["key"], name, reuse)
        assert rows["EFP uniform k=4 seq"]["reuse"]["key_steps"] == list(range(0, steps, 4))
        for name in ("AMR defaults", "AMR output"):
            reuse = rows[name]["reuse"]
            assert reuse["attention_steps_reused"] == reuse["schedule"].count("0") > 0, (model["key"], name, reuse)
            assert reuse["attention_calls_reused"] > 0, (model["key"], name, reuse)
        assert "output mode" in rows["AMR output"]["settings"] and "map mode" in rows["AMR defaults"]["settings"]

    # the nodes' own stats: one record per patched run (a warm-up is unpatched), each of which reused work
    encoder_runs = sum(1 for v in gpu_check.VARIANTS if v.encoder is not None) * len(doc["models"])
    attention_runs = sum(1 for v in gpu_check.VARIANTS if v.attention is not None) * len(doc["models"])
    assert len(runs.encoder) == encoder_runs and len(runs.attention) == attention_runs
    assert all(r.encoder_passes_saved > 0 for r in runs.encoder), runs.encoder
    assert all(r.calls_reused > 0 and r.reused_steps > 0 for r in runs.attention), runs.attention
    assert {r.mode for r in runs.attention} == {"map", "output"}
    assert runs.last(ENCODER).key_steps == tuple(doc["models"][-1]["variants"][-1]["reuse"]["key_steps"])
    assert runs.last(ATTENTION).calls_reused == doc["models"][-1]["variants"][-1]["reuse"]["attention_calls_reused"]
