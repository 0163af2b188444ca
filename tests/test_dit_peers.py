"""diffusers' TaylorSeer, MagCache and FasterCache as peer rows on the built-in DiT (``reuse_bench.methods_dit``):
each runs, skips what its note says, and leaves the shared transformer as it was, also after and before another
diffusers cache on the same model (as in the bench, where every row samples the same transformer)."""

from __future__ import annotations

import re

import pytest
import torch
from comfy_harness import NOT_IN_THIS_ENVIRONMENT

pytest.importorskip("diffusers", reason=f"diffusers {NOT_IN_THIS_ENVIRONMENT}")

from reuse_bench import methods_dit as MD
from reuse_bench.builtin_dit import load_builtin_dit
from reuse_bench.sampling_dit import DiTSampleSpec, sample_dit

STEPS = 8
SPEC = DiTSampleSpec((3, 7), (300, 301), STEPS)  # not the bench's seeds, not the calibration's
LAYERS = 6  # attention layers of the built-in DiT: 2 double-stream blocks, 4 single-stream


@pytest.fixture(scope="module")
def model():
    return load_builtin_dit()


@pytest.fixture(scope="module")
def reference(model):
    return sample_dit(model, SPEC)


NEW_PEERS = {
    "TaylorSeer default": lambda: MD.taylorseer(STEPS, 5, 3, "documented default"),
    "TaylorSeer k=2": lambda: MD.taylorseer(STEPS, 2, 1, "the key steps of uniform k=2"),
    "MagCache default": lambda: MD.mag_cache(STEPS),
    "FasterCache default": lambda: MD.faster_cache(STEPS, 681, "documented default"),
    "FasterCache Flux test": lambda: MD.faster_cache(STEPS, 901, "diffusers' Flux test setting"),
}


def skipped(note: str) -> int:
    found = re.search(r"(\d+)/(\d+)", note)
    assert found, note
    return int(found.group(1))


def run(model, method):
    predictor = method.make(model)
    return sample_dit(model, SPEC, predictor), predictor.note


@pytest.mark.parametrize("name", NEW_PEERS)
def test_peer_skips_work_and_leaves_no_state(model, reference, name):
    method = NEW_PEERS[name]()
    # Another diffusers cache first on the same transformer: diffusers keeps the hook registries it found at the
    # first cache context, so a later cache's hooks would get no context ("No context is set").
    _, before = run(model, MD.first_block_cache(STEPS, 0.1))
    assert before

    images, note = run(model, method)
    assert torch.isfinite(images).all(), name
    assert skipped(note) > 0, f"{name}: {note}"
    assert not torch.equal(images, reference), f"{name} skipped nothing ({note})"
    assert torch.equal(sample_dit(model, SPEC), reference), f"{name} left state in the model"

    again, again_note = run(model, method)  # a second run starts from scratch: same images, same work
    assert torch.equal(again, images) and again_note == note, name
    _, after = run(model, MD.first_block_cache(STEPS, 0.1))  # and a cache after it still works
    assert after == before
    assert torch.equal(sample_dit(model, SPEC), reference)


def test_taylorseer_at_the_key_steps_of_uniform_k2_forecasts_every_odd_step(model):
    _, note = run(model, NEW_PEERS["TaylorSeer k=2"]())
    assert note == f"attention calls forecast {STEPS // 2 * LAYERS}/{STEPS * LAYERS}"


def test_peer_rows(model):
    quick = [m.name for m in MD.peer_methods(24, quick=True)]
    full = [m.name for m in MD.peer_methods(24)]
    assert sum("TaylorSeer" in n for n in quick) == 1 and sum("MagCache" in n for n in quick) == 1
    assert "FasterCache" not in " ".join(quick)
    assert set(quick) <= set(full)
    assert [n for n in full if "TaylorSeer" in n] == [
        "DiT: TaylorSeer (diffusers hook, documented default: cache_interval 5, disable_cache_before_step 3, "
        "max_order 1)",
        "DiT: TaylorSeer (diffusers hook, the key steps of uniform k=2: cache_interval 2, disable_cache_before_step "
        "1, max_order 1)",
    ]
    assert sum("FasterCache" in n for n in full) == 2 and sum("MagCache" in n for n in full) == 1
    assert all(m.family == "peer" and not m.batch_dependent for m in MD.peer_methods(24) if "First Block" not in m.name)


def test_mag_ratios_are_this_models_calibration(model):
    """``DIT_MAG_RATIOS`` came from diffusers' calibration mode on the search seeds; the shipped weights still give
    them (MagCache's ratios belong to one checkpoint: new weights need a new calibration)."""
    ratios = MD.calibrate_mag_ratios(model)
    assert len(ratios) == len(MD.DIT_MAG_RATIOS) == 24
    torch.testing.assert_close(torch.tensor(ratios), torch.tensor(MD.DIT_MAG_RATIOS), rtol=0, atol=1e-4)
    assert torch.equal(sample_dit(model, SPEC), sample_dit(model, SPEC))


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
def test_faster_cache_cfg_part_cannot_run_on_flux(model, reference):
    """Why the FasterCache rows use guidance-distilled mode: its CFG-Cache takes a 2-D FFT of the model output as an
    image, and Flux's transformer returns tokens ``[B, tokens, channels]``. If diffusers lifts this, add the row."""
    from diffusers.hooks import FasterCacheConfig

    class WithCfgCache(MD.FasterCacheDiTPredictor):
        def config(self, steps):
            return FasterCacheConfig(
                attention_weight_callback=lambda _module: 0.5,
                current_timestep_callback=lambda: self.current_t,
                tensor_format="BCHW",  # the only format that takes a 3-D output; the default BCFHW fails sooner
                _unconditional_conditional_input_kwargs_identifiers=[
                    "hidden_states",
                    "encoder_hidden_states",
                    "timestep",
                    "pooled_projections",  # Flux's, absent from diffusers' list: without it the split fails sooner
                ],
            )

    with pytest.raises(RuntimeError, match="same number of dimensions"):
        sample_dit(model, DiTSampleSpec((3, 7), (300, 301), 24), WithCfgCache(model))
    assert torch.equal(sample_dit(model, SPEC), reference), "a failed run left state in the model"
