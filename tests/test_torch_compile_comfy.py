"""ComfyUI's own ``TorchCompileModel`` node (inductor on the CPU) before and after each of the pack's three nodes,
on a tiny real Flux (``tests/tiny_dits.py``), in real ComfyUI.

Per combination: the output equals the uncompiled patched model within ``REL_TOL`` (inductor reorders float sums);
the node's run statistics are exactly the uncompiled run's (the same steps reused, the same encoder passes saved:
the reuse really happens inside the compiled model); dynamo's recompilations are counted (its ``recompiles`` log),
at most ``FIRST_RUN_RECOMPILES`` on the first run and none on the next. Once (Encoder Feature Propagation after
compile) other step counts too: the first new count recompiles only for the new size of the run's sigma tensors,
the next one not at all. Reuse Calibrate after ``TorchCompileModel`` samples uncompiled and says so in one log line;
its schedules drive both nodes inside one compiled model. ``test_graph_compiled_without_the_node_is_reused_on_0_33``
is the combination that cannot work (ComfyUI 0.33 drops dynamo's guards on ``transformer_options``) and its warning.

Settings, chosen for compile time (every fresh inductor compile costs tens of seconds on two CPU cores):

* ComfyUI's attention is PyTorch SDPA in this module (what GPU users get; ``nodes/compile_support.py`` explains why
  the pack's logic must stay out of the graph there). ComfyUI's CPU default, sub-quadratic attention, asks psutil
  for free memory inside every attention call: a graph break each time, three times the graphs to compile.
* inductor with one compile thread and scalar C++ (``cpp.vec_isa_ok = False``): the same lowering and fusion as on
  any CPU, a third less compile time. Dynamo's caches are reset around every test (counts independent of order);
  inductor's on-disk cache is kept, so a graph compiled again in another test is not generated twice.
"""

import logging

import comfy_harness as h
import pytest
import tiny_dits
import torch
from run_records import ATTENTION, ENCODER, RunRecorder

STEPS = 6
REL_TOL = 1e-4  # relative L2 distance to the uncompiled patched model (measured: < 1e-5)
# Recompilations on a model's first run (ComfyUI's own frames meeting new shapes: text and image attention, the
# decoder-only pass): fewer than one per step. Measured on both versions: 3 (attention), 1 (encoder).
FIRST_RUN_RECOMPILES = 4
# Both nodes chained with calibrated schedules: each kind of pass (key step with or without feature capture,
# decoder-only pass, and a batch of those) meets ComfyUI's frames once. Measured on both versions: 13.
CHAIN_RECOMPILES = 16

CONFIGS = {
    "attention-output": ("AttentionMapReuse", dict(strategy="custom", custom_schedule="101101", mode="output")),
    "attention-map": ("AttentionMapReuse", dict(strategy="custom", custom_schedule="101101", mode="map")),
    "encoder-parallel": ("EncoderFeaturePropagation", dict(key_steps="uniform", uniform_k=3)),
    "encoder-sequential": (
        "EncoderFeaturePropagation",
        dict(key_steps="uniform", uniform_k=3, parallel_decoding=False),
    ),
}
NODE_OF = {"AttentionMapReuse": ATTENTION, "EncoderFeaturePropagation": ENCODER}


class CompileCounter:
    """Dynamo's recompilations (its ``recompiles`` log, one record per recompilation, with the failed guard) and
    compiled graphs (``counters["stats"]["unique_graphs"]``) while active."""

    LOGGER = "torch._dynamo.guards.__recompiles"

    def __init__(self):
        self.reasons: list[str] = []
        self.graphs = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.reasons.append(record.getMessage())

    def __enter__(self):
        from torch._dynamo.utils import counters

        self._start = counters["stats"]["unique_graphs"]
        self._handler = logging.Handler()
        self._handler.emit = self.emit
        logger = logging.getLogger(self.LOGGER)
        logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        from torch._dynamo.utils import counters

        logging.getLogger(self.LOGGER).removeHandler(self._handler)
        self.graphs = counters["stats"]["unique_graphs"] - self._start

    @property
    def recompiles(self) -> int:
        return len(self.reasons)


@pytest.fixture(scope="module")
def compile_env(comfy):
    """SDPA attention, inductor's compile-time settings and dynamo's recompile log for this module (restored)."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention as attention
    import torch._inductor.config

    names = [(attention, "optimized_attention"), (attention, "optimized_attention_masked")]
    names.append((comfy.ldm.flux.math, "optimized_attention"))
    saved = [(module, name, getattr(module, name)) for module, name in names]
    for module, name in names:
        setattr(module, name, attention.attention_pytorch)
    logger = logging.getLogger(CompileCounter.LOGGER)
    logger_state = (logger.level, logger.propagate)
    torch._logging.set_logs(recompiles=True)
    logger.propagate = False  # counted here, not printed
    inductor = torch._inductor.config.patch({"compile_threads": 1, "cpp.vec_isa_ok": False})
    inductor.__enter__()
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()
        inductor.__exit__(None, None, None)
        torch._logging.set_logs()
        logger.setLevel(logger_state[0])
        logger.propagate = logger_state[1]
        for module, name, value in saved:
            setattr(module, name, value)


@pytest.fixture(scope="module")
def flux(compile_env):
    return tiny_dits.build("flux")


@pytest.fixture(autouse=True)
def fresh_dynamo(compile_env):
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(model):
    """``model`` through ComfyUI's own ``TorchCompileModel`` node with its default backend, inductor."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    return TorchCompileModel.execute(model, "inductor").result[0]


def patched(node_id: str, model, **overrides):
    node = h.pack_node(node_id)
    return node.execute(model=model, **h.node_inputs(node, **overrides)).result[0]


class Runs:
    """Samples ``model`` on the tiny Flux, recording the node's stats and dynamo's work per run."""

    def __init__(self, dit):
        self.dit = dit

    def __call__(self, model, steps: int = STEPS):
        with RunRecorder() as records, CompileCounter() as counter:
            out = tiny_dits.sample(self.dit, model, steps)
        return out, records.records, counter


@pytest.fixture(scope="module")
def uncompiled(flux):
    """Per configuration and step count: the uncompiled patched model's output and run records."""
    cache = {}

    def get(config: str, steps: int = STEPS):
        if (config, steps) not in cache:
            node_id, settings = CONFIGS[config]
            out, records, _ = Runs(flux)(patched(node_id, flux.patcher, **settings), steps)
            cache[config, steps] = out, records
        return cache[config, steps]

    return get


def rel_diff(a, b) -> float:
    return float((a - b).norm() / b.norm())


def check_compiled_runs(runs: Runs, model, config: str, uncompiled, other_step_counts: bool = False) -> list[int]:
    """Runs of the compiled ``model``: equal to the uncompiled runs, same stats, recompiles bounded on the first run
    and none on the second. ``other_step_counts``: then a run of twice the steps recompiles only for the new size of
    the run's sigma tensors (dynamo then makes that size dynamic), and one of three times the steps not at all."""
    node = NODE_OF[CONFIGS[config][0]]
    reference, ref_records = uncompiled(config)
    first, records, counter = runs(model)
    assert torch.isfinite(first).all()
    assert rel_diff(first, reference) <= REL_TOL, rel_diff(first, reference)
    assert records == ref_records, f"the compiled run reused differently:\n{records}\n{ref_records}"
    record = records[-1]
    assert record.node == node
    assert record.calls_reused > 0 or record.encoder_passes_saved > 0, record
    assert counter.graphs > 0, "nothing was compiled"
    assert counter.recompiles <= FIRST_RUN_RECOMPILES, counter.reasons
    recompiles = [counter.recompiles]
    again, records, counter = runs(model)
    assert torch.equal(again, first) and records == ref_records
    assert counter.recompiles == 0 and counter.graphs == 0, counter.reasons
    recompiles.append(counter.recompiles)
    for steps, limit in ((2 * STEPS, FIRST_RUN_RECOMPILES), (3 * STEPS, 0)) if other_step_counts else ():
        longer, records, counter = runs(model, steps)
        reference, ref_records = uncompiled(config, steps)
        assert rel_diff(longer, reference) <= REL_TOL and records == ref_records
        assert counter.recompiles <= limit, counter.reasons
        assert all("size mismatch" in reason for reason in counter.reasons), counter.reasons
        recompiles.append(counter.recompiles)
    return recompiles


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_node_then_compile(flux, uncompiled, config):
    """Load -> node -> TorchCompileModel -> sampler."""
    node_id, settings = CONFIGS[config]
    model = compiled(patched(node_id, flux.patcher, **settings))
    counts = check_compiled_runs(Runs(flux), model, config, uncompiled, other_step_counts=config == "encoder-parallel")
    print(config, "after: recompiles per run", counts)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["attention-output", "encoder-parallel"])
def test_compile_then_node(flux, uncompiled, config):
    """Load -> TorchCompileModel -> node -> sampler."""
    node_id, settings = CONFIGS[config]
    model = patched(node_id, compiled(flux.patcher), **settings)
    print(config, "before: recompiles per run", check_compiled_runs(Runs(flux), model, config, uncompiled))


CALIBRATE = dict(seed=3, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="normal", target=2.0)


def calibrate(model, dit):
    node = h.pack_node("ReuseCalibrate")
    inputs = {i.id: i.default for i in node.define_schema().inputs if hasattr(i, "default")}  # widgets only
    inputs.update(CALIBRATE)
    latent = {"samples": dit.latent.clone()}
    result = node.execute(model=model, positive=dit.positive, negative=dit.negative, latent_image=latent, **inputs)
    return result.result


def test_compile_then_calibrate_records_uncompiled(flux, caplog):
    """Load -> TorchCompileModel -> Reuse Calibrate: the recording run samples uncompiled, says so, and calibrates
    exactly as without TorchCompileModel."""
    reference = calibrate(flux.patcher, flux)
    with CompileCounter() as counter, caplog.at_level(logging.INFO):
        result = calibrate(compiled(flux.patcher), flux)
    assert counter.graphs == 0 and counter.recompiles == 0
    assert result[:3] == reference[:3]  # key steps, schedule, report, latent, ...
    assert torch.equal(result[3]["samples"], reference[3]["samples"])
    lines = [r.getMessage() for r in caplog.records if "torch.compile'd" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("Reuse Calibrate: ") and "uncompiled" in lines[0], lines


@pytest.mark.slow
def test_calibrated_nodes_then_compile(flux):
    """Load -> Reuse Calibrate -> (key_steps, schedule) -> Encoder Feature Propagation -> Attention Map Reuse ->
    TorchCompileModel -> sampler: both calibrated nodes chained inside one compiled model."""
    keys, schedule = calibrate(flux.patcher, flux)[:2]
    model = patched("EncoderFeaturePropagation", flux.patcher, key_steps="custom", custom_key_steps=keys)
    model = patched("AttentionMapReuse", model, strategy="custom", custom_schedule=schedule, mode="output")
    runs = Runs(flux)
    reference, ref_records, _ = runs(model)
    assert {r.node for r in ref_records} == {ATTENTION, ENCODER}
    assert any(r.reused_steps > 0 for r in ref_records), ref_records
    model = compiled(model)
    first, records, counter = runs(model)
    assert rel_diff(first, reference) <= REL_TOL and records == ref_records
    assert counter.graphs > 0 and counter.recompiles <= CHAIN_RECOMPILES, counter.reasons
    first_recompiles = counter.recompiles
    again, records, counter = runs(model)
    assert torch.equal(again, first) and records == ref_records
    assert counter.recompiles == 0 and counter.graphs == 0, counter.reasons
    print("calibrated chain: recompiles per run", [first_recompiles, counter.recompiles])


@pytest.mark.slow
def test_graph_compiled_without_the_node_is_reused_on_0_33(flux, uncompiled, caplog):
    """The combination that cannot work: the model sampled compiled without the node first, then with it (same
    latent size). ComfyUI 0.3.64 keeps dynamo's guards: the patched model recompiles and reuses. ComfyUI 0.33's
    TorchCompileModel drops the guards on transformer_options: the unpatched graph runs for the patched model, the
    node sees no call, and says so in one warning after the run."""
    config = "attention-output"
    node_id, settings = CONFIGS[config]
    base = compiled(flux.patcher)
    plain, _, _ = Runs(flux)(base)
    model = patched(node_id, base, **settings)
    with caplog.at_level(logging.WARNING):
        out, records, _ = Runs(flux)(model)
    warnings = [r.getMessage() for r in caplog.records if "nothing was reused" in r.getMessage()]
    if "guard_filter_fn" in _torch_compile_node_source():  # ComfyUI 0.33 and later
        assert torch.equal(out, plain), "the patched model did not run the graph compiled without the node"
        assert records[-1].calls_reused == 0
        assert len(warnings) == 1 and warnings[0].startswith("Attention Map Reuse: no attention call"), warnings
    else:
        reference, ref_records = uncompiled(config)
        assert rel_diff(out, reference) <= REL_TOL and records == ref_records
        assert not warnings


def _torch_compile_node_source() -> str:
    import inspect

    import comfy_extras.nodes_torch_compile

    return inspect.getsource(comfy_extras.nodes_torch_compile)
