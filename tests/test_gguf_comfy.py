"""The three nodes on GGUF-quantized transformers loaded by the unmodified ComfyUI-GGUF (``UnetLoaderGGUF``).

Each tiny model (``gguf_support.GGUF_FAMILIES``: Flux.1 where the running ComfyUI can detect a tiny one, Wan 2.1)
is written as a ``.gguf`` file in the test, once as Q8_0 and once as Q4_0 (the 4-bit quant the ``gguf`` package can
write), with ComfyUI-GGUF's own conversion rules, and loaded through its loader node: a ``GGUFModelPatcher`` whose
linear layers dequantize their weights on the fly. On each:

* Attention Map Reuse with 0 reuse steps and Encoder Feature Propagation with every step a key step are bit-identical
  to the unpatched GGUF model; with reuse (output and map mode; parallel and sequential decoding) the node's stats
  show the reuse, and the output is finite and differs from the unpatched one;
* Reuse Calibrate's run is the unpatched GGUF run bit for bit, and its schedules drive both nodes.
"""

import collections

import comfy_harness as h
import gguf_support as gs
import pytest
import tiny_dits
import torch
from run_records import ATTENTION, ENCODER

STEPS = 6
QUANTS = ["Q8_0", "Q4_0"]
FAMILIES = list(gs.GGUF_FAMILIES)


@pytest.fixture(scope="module")
def loader(comfy, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    (root / "custom_nodes").mkdir()
    (root / "models").mkdir()
    mappings = gs.comfyui_gguf(root / "custom_nodes", root / "models")
    for node_id in ("AttentionMapReuse", "EncoderFeaturePropagation"):  # imported before ``runs`` wraps them
        h.pack_node(node_id)
    yield mappings["UnetLoaderGGUF"], root / "models"
    gs.forget_models_folder(root / "models")


@pytest.fixture(scope="module")
def gguf_models(loader):
    """Per (family, quant): (TinyDiT with the GGUF patcher, its unpatched output, the types written)."""
    node, folder = loader
    cache = {}

    def get(family: str, quant: str):
        if (family, quant) not in cache:
            spec = gs.require_family(family)
            dit = spec.build(0)
            name = f"tiny-{family}-{quant}.gguf"
            state_dict = dit.patcher.model.diffusion_model.state_dict()
            written = gs.write_gguf(folder / name, state_dict, spec.arch, quant, spec.hiprec)
            (patcher,) = node().load_unet(name)
            dit = dit._replace(patcher=patcher)
            cache[family, quant] = dit, tiny_dits.sample(dit, patcher, STEPS), written
        return cache[family, quant]

    yield get
    cache.clear()


def run(dit, model):
    return tiny_dits.sample(dit, model, STEPS)


def patched(node_id: str, model, **overrides):
    node = h.pack_node(node_id)
    return node.execute(model=model, **h.node_inputs(node, **overrides)).result[0]


def rel_diff(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_through_comfyui_gguf(gguf_models, family, quant):
    """The file holds the quant, ComfyUI-GGUF's loader gives its patcher with quantized layers, the model samples."""
    dit, full, written = gguf_models(family, quant)
    counts = collections.Counter(written.values())
    assert counts[quant] > 0 and set(counts) <= {quant, "F32", "F16"}, counts
    assert type(dit.patcher).__name__ == "GGUFModelPatcher"
    kinds = {
        getattr(getattr(m.weight, "tensor_type", None), "name", None)
        for m in dit.patcher.model.diffusion_model.modules()
        if isinstance(m, torch.nn.Linear)
    }
    assert quant in kinds, kinds
    assert torch.isfinite(full).all() and full.abs().max() > 0
    assert torch.equal(run(dit, dit.patcher), full), "the GGUF model must sample deterministically"


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_map_reuse(gguf_models, runs, family, quant):
    dit, full, _ = gguf_models(family, quant)
    zero = run(dit, patched("AttentionMapReuse", dit.patcher, reuse_steps=0))
    stats = runs.last(ATTENTION)
    assert stats.reused_steps == 0 and stats.layers > 0, stats
    assert torch.equal(zero, full), "0 reuse steps must be bit-identical to the unpatched GGUF model"
    for mode in ("output", "map"):
        out = run(dit, patched("AttentionMapReuse", dit.patcher, strategy="hurry", reuse_steps=3, mode=mode))
        stats = runs.last(ATTENTION)
        assert stats.reused_steps == 3 and stats.calls_reused > 0 and stats.fallbacks == 0, stats
        assert torch.isfinite(out).all() and not torch.equal(out, full)
        assert rel_diff(out, full) < 1.0


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_feature_propagation(gguf_models, runs, family, quant):
    dit, full, _ = gguf_models(family, quant)
    every = run(dit, patched("EncoderFeaturePropagation", dit.patcher, key_steps="uniform", uniform_k=1))
    stats = runs.last(ENCODER)
    assert stats.model_calls > 0 and stats.encoder_passes_saved == 0, stats
    assert torch.equal(every, full), "every step a key step must be bit-identical to the unpatched GGUF model"
    outs = []
    for parallel in (True, False):
        settings = dict(key_steps="uniform", uniform_k=3, parallel_decoding=parallel)
        outs.append(run(dit, patched("EncoderFeaturePropagation", dit.patcher, **settings)))
        stats = runs.last(ENCODER)
        assert stats.key_steps == (0, 3) and stats.encoder_passes_saved == 4, stats
    assert torch.isfinite(outs[0]).all() and not torch.equal(outs[0], full)
    assert rel_diff(outs[0], outs[1]) <= 1e-4, "parallel decoding must equal sequential"


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_reuse_calibrate(gguf_models, runs, family, quant):
    dit, full, _ = gguf_models(family, quant)
    node = h.pack_node("ReuseCalibrate")
    inputs = {i.id: i.default for i in node.define_schema().inputs if hasattr(i, "default")}  # widgets only
    inputs.update(seed=0, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="normal", target=2.0)
    latent = {"samples": dit.latent.clone()}
    result = node.execute(
        model=dit.patcher, positive=dit.positive, negative=dit.negative, latent_image=latent, **inputs
    ).result
    keys, schedule, out = result[0], result[1], result[3]  # key_steps, schedule, report, latent, ...
    assert torch.equal(out["samples"], full), "the calibration run must be the unpatched GGUF run"
    key_steps = [int(k) for k in keys.split(",")]
    assert key_steps[0] == 0 and len(key_steps) == STEPS - 2, keys
    assert len(schedule) == STEPS and schedule.count("0") == 2, schedule
    model = patched("EncoderFeaturePropagation", dit.patcher, key_steps="custom", custom_key_steps=keys)
    model = patched("AttentionMapReuse", model, strategy="custom", custom_schedule=schedule, mode="output")
    calibrated = run(dit, model)
    assert runs.last(ENCODER).encoder_passes_saved == 2
    assert torch.isfinite(calibrated).all() and not torch.equal(calibrated, full)
