"""Helpers for the compatibility matrix (tests/test_compat_*.py), all running real ComfyUI on the CPU.

- ``tiny_controlnet``: a core ``comfy.controlnet.ControlNet`` around ComfyUI's own ``cldm.ControlNet``
  built from the tiny U-Net config, randomly initialised (zero convs included, so it changes the image).
- ``with_controlnet``: applies it to conditioning exactly like the core "Apply ControlNet" node.
- ``with_lora``: a kohya-format LoRA on the attention projections, applied through ComfyUI's LoRA loader path.
- ``LogCapture``: collects log messages during a block, and what each node's runs did (``runs_of``,
  ``one_run``: ``run_records.RunRecord``s read from the engines' stats objects, not parsed from the log).
- ``Method`` / ``METHODS``: the node configurations of the matrix, as overrides on the node's schema defaults.
- ``patcher_snapshot``: everything a patch node could modify on a ``ModelPatcher``, for "input unchanged".
- ``ComfyExecutor``: ComfyUI's own ``execution.PromptExecutor`` in process with a stub server, the pack and
  the test-only node pack ``tests/compat_nodes`` loaded through ``nodes.load_custom_node``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from comfy_harness import (
    PACK_DIR,
    TINY_SD15_CONFIG,
    TINY_SDXL_CONFIG,
    import_comfy,
    load_pack,
    node_inputs,
    pack_node,
    tiny_model,
)
from run_records import RunRecord, RunRecorder

COMPAT_NODES_DIR = Path(__file__).resolve().parent / "compat_nodes"

# Latents written by the test-only ``CompatLatentStash`` output node, keyed by its ``key`` input.
LATENT_STASH: dict[str, torch.Tensor] = {}
# How often each test-only source node really executed (not served from ComfyUI's cache), by node type.
EXECUTION_COUNTS: dict[str, int] = {}


# ------------------------------------------------------------------------------------------------------ model
def compat_model(kind: str = "sd15", seed: int = 0):
    """``tiny_model(kind, seed)`` with attention that matters.

    The harness initialises every weight with std 0.02, which leaves the attention maps nearly uniform and
    the attention branch a rounding error of the residual stream: reusing attention then changes nothing
    measurable at low-noise steps, and a wrong step index would go unnoticed. Larger q/k/v/out projections
    make the maps peaked and the branch significant, so every reused step shows in the output.
    """
    patcher = tiny_model(kind, seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, weight in patcher.model.diffusion_model.named_parameters():
            if (".attn1." in name or ".attn2." in name) and name.endswith("weight"):
                std = 0.5 if (".to_q." in name or ".to_k." in name) else 0.2
                weight.copy_(torch.randn(weight.shape, generator=gen) * std)
    return patcher


# ----------------------------------------------------------------------------------------------- result checks
def assert_finite(latent: torch.Tensor, what: str = "output") -> None:
    assert torch.isfinite(latent).all(), f"{what} has non-finite values"
    assert latent.abs().max() > 0, f"{what} is all zeros"


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


class Trajectory:
    """Per-step (x, denoised) from the sampler callback, i.e. what every step of the run really saw and produced.

    ``x[i]`` is the latent entering step ``i``; ``denoised[i]`` the model's prediction at step ``i``. A step whose
    model call was altered shows first in ``denoised[i]`` while ``x[i]`` still matches the unaltered run; an
    alteration attributed to the wrong step (e.g. heun's second evaluation of step i-1) shows in ``x[i]`` first.
    """

    def __init__(self):
        self.x: list[torch.Tensor] = []
        self.denoised: list[torch.Tensor] = []
        self.total_steps: int | None = None

    def __call__(self, step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        assert step == len(self.x), f"sampler callback skipped from step {len(self.x)} to {step}"
        self.x.append(x.detach().clone())
        self.denoised.append(x0.detach().clone())
        self.total_steps = total_steps

    @property
    def steps(self) -> int:
        return len(self.x)


def first_altered_step(test: Trajectory, reference: Trajectory, atol: float = 0.0) -> tuple[int | None, str]:
    """The first step whose input (``"x"``) or prediction (``"denoised"``) differs from ``reference`` by > atol."""
    assert test.steps == reference.steps, f"{test.steps} steps ran vs {reference.steps} in the reference run"
    for i in range(test.steps):
        if max_abs_diff(test.x[i], reference.x[i]) > atol:
            return i, "x"
        if max_abs_diff(test.denoised[i], reference.denoised[i]) > atol:
            return i, "denoised"
    return None, ""


# --------------------------------------------------------------------------------------------------- ControlNet
def tiny_controlnet(kind: str = "sd15", seed: int = 7, std: float = 0.05):
    """A core ``ControlNet`` (CONTROL_NET type) whose control model matches ``tiny_model(kind)``."""
    import_comfy()
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = dict(TINY_SD15_CONFIG if kind == "sd15" else TINY_SDXL_CONFIG)
    config.pop("out_channels")
    config.pop("transformer_depth_output")  # the control net has no decoder
    device = torch.device("cpu")
    control_model = comfy.cldm.cldm.ControlNet(
        hint_channels=3, dtype=torch.float32, device=device, operations=comfy.ops.disable_weight_init, **config
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in control_model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif "norm" in name or name.endswith("bias"):
                param.zero_()
            else:
                # Real zero convs start at zero; random ones make the control visible in the output.
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return comfy.controlnet.ControlNet(control_model, load_device=device)


def control_hint(size: int = 16, seed: int = 11, batch: int = 1) -> torch.Tensor:
    """An IMAGE (B, H, W, 3) in [0, 1] at pixel size (latent size x 8)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, size * 8, size * 8, 3, generator=gen)


def with_controlnet(positive, negative, control_net, strength: float = 1.0, size: int = 16, start=0.0, end=1.0):
    """(positive, negative) with the ControlNet applied by the core ``ControlNetApplyAdvanced`` node."""
    import_comfy()
    import nodes

    return nodes.ControlNetApplyAdvanced().apply_controlnet(
        positive, negative, control_net, control_hint(size), strength, start, end
    )


# --------------------------------------------------------------------------------------------------------- LoRA
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")


def tiny_lora_state_dict(patcher, rank: int = 4, seed: int = 5, std: float = 0.3) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA (``lora_unet_*.lora_up/lora_down/alpha``) for every attention q/k/v projection."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for key, weight in patcher.model.state_dict().items():
        if not key.startswith("diffusion_model.") or not key.endswith(".weight"):
            continue
        if not any(f".{target}." in key for target in LORA_TARGETS):
            continue
        out_features, in_features = weight.shape[0], weight.shape[1]
        name = "lora_unet_" + key[len("diffusion_model.") : -len(".weight")].replace(".", "_")
        lora[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * std
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * std
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    assert lora, "the tiny model has no attention projections to patch"
    return lora


def with_lora(patcher, strength: float = 1.0, seed: int = 5):
    """``patcher`` with a LoRA applied the way the core ``LoraLoaderModelOnly`` node does it."""
    import_comfy()
    import comfy.sd

    patched, _ = comfy.sd.load_lora_for_models(patcher, None, tiny_lora_state_dict(patcher, seed=seed), strength, 0)
    assert len(patched.patches) == len(tiny_lora_state_dict(patcher, seed=seed)) // 3, "LoRA keys did not load"
    return patched


# ------------------------------------------------------------------------------------------------------ logging
class LogCapture(logging.Handler):
    """Collects every log record (INFO and up) emitted while active, from any logger, and (``runs``, a
    ``run_records.RunRecorder``) what every run of either node did, from the engines' stats objects."""

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []
        self._old_level: int | None = None
        self.runs = RunRecorder()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]

    def matching(self, *needles: str) -> list[str]:
        return [m for m in self.messages if all(n.lower() in m.lower() for n in needles)]

    def __enter__(self) -> LogCapture:
        self.runs.__enter__()
        root = logging.getLogger()
        self._old_level = root.level
        root.setLevel(min(root.level or logging.WARNING, self.level))
        root.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._old_level)
        self.runs.__exit__(*exc)


# ------------------------------------------------------------------------------------------------ model checks
def _structure(value, depth: int = 0):
    """A comparable picture of nested options: containers by content, objects by identity."""
    if depth > 8:
        return ("deep", id(value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), _structure(v, depth + 1)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_structure(v, depth + 1) for v in value))
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), tuple(value.shape))
    return (type(value).__name__, id(value))


def patcher_snapshot(patcher) -> tuple:
    """Everything a MODEL -> MODEL node could change on the ``ModelPatcher`` it receives."""
    return (
        _structure(patcher.model_options),
        _structure(patcher.patches),
        _structure(patcher.object_patches),
        _structure(patcher.wrappers),
        _structure(patcher.callbacks),
        _structure(patcher.attachments),
        _structure(getattr(patcher, "additional_models", {})),
        _structure(getattr(patcher, "injections", {})),
        id(patcher.model),
    )


def weights_checksum(patcher) -> float:
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in patcher.model.parameters()))


# ----------------------------------------------------------------------------------------- in-process executor
class _StubServer:
    """What ``execution.PromptExecutor`` needs from ``server.PromptServer``: a client id and ``send_sync``."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


class ComfyExecutor:
    """ComfyUI's executor with the classic output cache, as the server runs it, but in this process."""

    _nodes_loaded = False

    def __init__(self):
        import_comfy()
        import execution

        self._load_nodes()
        self.server = _StubServer()
        # ComfyUI after 0.3.64 takes cache_args (and reads its "ram" entries on every prompt) instead of cache_size.
        extra = {"cache_args": {"lru": 0, "ram": 0, "ram_inactive": 0}}
        if "cache_args" not in inspect.signature(execution.PromptExecutor).parameters:
            extra = {}
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC, **extra)

    @classmethod
    def _load_nodes(cls) -> None:
        if cls._nodes_loaded:
            return
        import nodes

        load_pack()  # the pack as package ``comfyui_reuse``, like ComfyUI would import it
        for node_dir in (PACK_DIR, COMPAT_NODES_DIR):
            if not asyncio.run(nodes.load_custom_node(str(node_dir))):
                raise RuntimeError(f"ComfyUI could not load the custom node pack at {node_dir}")
        for required in ("AttentionMapReuse", "EncoderFeaturePropagation", "CompatTinyModel", "CompatLatentStash"):
            if required not in nodes.NODE_CLASS_MAPPINGS:
                raise RuntimeError(f"node {required} is not registered after loading the packs")
        cls._nodes_loaded = True

    def run(self, prompt: dict) -> list[str]:
        """Validate and execute an API-format prompt; returns the ids of the nodes served from the cache."""
        import execution

        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        ok, error, outputs, node_errors = valid[0], valid[1], valid[2], valid[3]
        if not ok:
            raise AssertionError(f"prompt failed validation: {error} {node_errors}")
        self.executor.execute(prompt, prompt_id, {}, outputs)
        if not self.executor.success:
            errors = [data for event, data in self.executor.status_messages if event == "execution_error"]
            raise ExecutionFailed(errors[0] if errors else {"exception_message": "unknown failure"})
        cached = [data["nodes"] for event, data in self.executor.status_messages if event == "execution_cached"]
        return list(cached[0]) if cached else []


class ExecutionFailed(AssertionError):
    def __init__(self, error: dict):
        self.error = error
        super().__init__(f"{error.get('node_type')}: {error.get('exception_type')}: {error.get('exception_message')}")


# ------------------------------------------------------------------------------------------- prompt building
class PromptBuilder:
    """Builds API-format prompts: ``add(class_type, **inputs)`` returns the node id; links are ``(id, slot)``."""

    def __init__(self):
        self.prompt: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.prompt) + 1)
        self.prompt[node_id] = {
            "class_type": class_type,
            "inputs": {k: list(v) if isinstance(v, tuple) else v for k, v in inputs.items()},
        }
        return node_id

    def tiny_model(self, kind: str = "sd15", seed: int = 0) -> tuple[str, int]:
        return (self.add("CompatTinyModel", kind=kind, seed=seed), 0)

    def conditioning(self, kind: str = "sd15", seed: int = 1) -> tuple[tuple[str, int], tuple[str, int]]:
        node = self.add("CompatConditioning", kind=kind, seed=seed)
        return (node, 0), (node, 1)

    def empty_latent(self, size: int = 16, batch: int = 1) -> tuple[str, int]:
        return (self.add("EmptyLatentImage", width=size * 8, height=size * 8, batch_size=batch), 0)

    def ksampler(
        self,
        model,
        positive,
        negative,
        latent,
        *,
        seed=0,
        steps=6,
        cfg=5.0,
        sampler="euler",
        scheduler="normal",
        denoise=1.0,
    ) -> tuple[str, int]:
        return (
            self.add(
                "KSampler",
                model=model,
                seed=seed,
                steps=steps,
                cfg=cfg,
                sampler_name=sampler,
                scheduler=scheduler,
                positive=positive,
                negative=negative,
                latent_image=latent,
                denoise=denoise,
            ),
            0,
        )

    def stash(self, latent, key: str) -> str:
        return self.add("CompatLatentStash", samples=latent, key=key)


# ------------------------------------------------------------------------------------------- methods under test
def runs_of(log: LogCapture) -> list[RunRecord]:
    """Every run either node ended while ``log`` was active, in order, from the engines' stats objects."""
    return list(log.runs.records)


def one_run(log: LogCapture) -> RunRecord:
    runs = runs_of(log)
    assert len(runs) == 1, f"expected exactly one run record for one sampler run, got {len(runs)}: {runs}"
    return runs[0]


# What the matrix sets on top of each node's own schema defaults (``node_inputs``).
ATTENTION_OVERRIDES = dict(strategy="hurry", reuse_steps=2, memory_budget_mb=256)
ENCODER_OVERRIDES = dict(key_steps="uniform", uniform_k=3)
OVERRIDES = {"AttentionMapReuse": ATTENTION_OVERRIDES, "EncoderFeaturePropagation": ENCODER_OVERRIDES}


def matrix_inputs(node_id: str, **overrides) -> dict:
    """Every widget input of the node: its schema default, the matrix's settings, then ``overrides``."""
    return node_inputs(pack_node(node_id), **{**OVERRIDES[node_id], **overrides})


@dataclass(frozen=True)
class Method:
    """One node configuration of the matrix, with what it must do on a run of ``steps`` steps.

    Built at import time (for parametrize ids), before ComfyUI is imported: ``inputs`` reads the node's schema
    defaults when first asked.
    """

    id: str
    node_id: str
    overrides: dict = field(default_factory=dict)  # on top of OVERRIDES[node_id]

    @property
    def inputs(self) -> dict:
        """Every widget input: the schema defaults, the matrix's settings and this configuration's own."""
        return matrix_inputs(self.node_id, **self.overrides)

    def node(self):
        return pack_node(self.node_id)

    def apply(self, model, **overrides):
        inputs = {**self.inputs, **overrides}
        return self.node().execute(model=model, **inputs).result[0]

    @property
    def off_inputs(self) -> dict:
        """The same node with its method switched off (documented to be bit-identical to no node)."""
        return {"reuse_steps": 0} if self.node_id == "AttentionMapReuse" else {"uniform_k": 1}

    def apply_off(self, model):
        return self.apply(model, **self.off_inputs)

    def expected_reuse_steps(self, steps: int) -> tuple[int, ...]:
        """Steps (0-based, of the run actually made) that must reuse rather than compute."""
        inputs = self.inputs
        if self.node_id == "AttentionMapReuse":
            assert inputs["strategy"] == "hurry"
            return tuple(range(steps - inputs["reuse_steps"], steps))
        assert inputs["key_steps"] == "uniform"
        return tuple(i for i in range(steps) if i % inputs["uniform_k"] != 0)

    def expected_key_steps(self, steps: int) -> tuple[int, ...]:
        """Encoder propagation: the steps that must run the whole U-Net."""
        reuse = self.expected_reuse_steps(steps)
        return tuple(i for i in range(steps) if i not in reuse)

    def check_stats(self, stats: RunRecord, steps: int) -> None:
        """The run's stats say the schedule was applied to the ``steps`` steps really run."""
        reuse = self.expected_reuse_steps(steps)
        assert stats.node == self.node_id, stats
        assert stats.steps == steps, f"node counted {stats.steps} steps, the sampler ran {steps}: {stats}"
        assert stats.reused_steps == len(reuse), f"expected {len(reuse)} reuse steps: {stats}"
        if self.node_id == "AttentionMapReuse":
            assert stats.schedule == "".join("0" if i in reuse else "1" for i in range(steps)), stats
            assert stats.fallbacks == 0 and stats.refused == 0, f"reuse fell back to computing: {stats}"
            assert stats.calls_reused > 0, stats
        else:
            assert stats.key_steps == self.expected_key_steps(steps), stats
            assert stats.encoder_passes_saved >= len(reuse), stats


METHODS = (
    Method("attn-map", "AttentionMapReuse", dict(mode="map")),
    Method("attn-output", "AttentionMapReuse", dict(mode="output")),
    Method("enc-parallel", "EncoderFeaturePropagation", dict(parallel_decoding=True)),
    Method("enc-sequential", "EncoderFeaturePropagation", dict(parallel_decoding=False)),
)
METHOD_IDS = [m.id for m in METHODS]
# One per node: the "method off" configuration does not depend on mode / parallel decoding.
NODE_METHODS = (METHODS[0], METHODS[2])
NODE_METHOD_IDS = [m.id for m in NODE_METHODS]

# Forecasting (``forecast = linear``) on the matrix's settings: attention forecasts outputs only (map mode refuses it).
FORECAST_METHODS = (
    Method("attn-output-linear", "AttentionMapReuse", dict(mode="output", forecast="linear")),
    Method("enc-parallel-linear", "EncoderFeaturePropagation", dict(parallel_decoding=True, forecast="linear")),
    Method("enc-sequential-linear", "EncoderFeaturePropagation", dict(parallel_decoding=False, forecast="linear")),
)
FORECAST_METHOD_IDS = [m.id for m in FORECAST_METHODS]
