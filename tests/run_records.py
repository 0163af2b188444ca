"""What each sampler run of either node did, read from the engines' own stats objects (not from the log line).

Both nodes keep a run's state on one object made in their ``OUTER_SAMPLE`` wrapper and end the run in its
``finally`` by logging the summary line and calling ``reset()``: ``attention_hooks.AttentionRuns`` (one
``AttentionReuseRun`` per device: ``.stats``, a ``ReuseStats``; ``.cache``, an ``AttentionCache``) and
``encoder_hooks.EncoderPropagationRun`` (``.plan``; ``.engine.stats``, a ``PropagationStats``). While a
``RunRecorder`` is active, those two ``reset`` methods first hand the ending run to every active recorder, which
keeps a ``RunRecord`` of it (the stats objects themselves, which ``reset`` replaces rather than clears, and the
numbers ``reset`` clears in place, such as the cache's peak bytes); then the original ``reset`` runs.

The pack can be loaded twice in one process (``comfyui_reuse`` by ``comfy_harness.load_pack`` and once more by
ComfyUI's ``nodes.load_custom_node`` for the in-process executor); every loaded copy is wrapped.

The summary line's format is kept in step with these records by one test:
``tests/test_chained_methods_comfy.py::test_run_summary_lines_match_the_recorded_stats``.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from comfy_harness import PACK_DIR, load_pack

ATTENTION = "AttentionMapReuse"
ENCODER = "EncoderFeaturePropagation"
_HOOK_FILES = {
    (PACK_DIR / "nodes" / "attention_hooks.py").resolve(): ("AttentionRuns", "_record_attention"),
    (PACK_DIR / "nodes" / "encoder_hooks.py").resolve(): ("EncoderPropagationRun", "_record_encoder"),
}


@dataclass(frozen=True)
class RunRecord:
    """One sampler run of one node (attention: one per device), as its engine counted it when the run ended.

    Equality compares every number below (the run's work, never its wall time); ``stats`` is kept for what the
    fields do not cover and is left out of the comparison.
    """

    node: str  # ATTENTION or ENCODER
    steps: int  # the run's steps (attention: the resolved schedule's length; encoder: the plan's)
    reused_steps: int  # attention: steps that reused; encoder: decoder-only steps (steps - key steps)
    # attention (AttentionReuseRun, its config and cache)
    device: str = ""
    schedule: str = ""  # the resolved bit string, 1 = compute
    mode: str = ""  # "map" / "output"
    layers: int = 0
    calls_reused: int = 0
    stored: int = 0
    computed: int = 0  # as the summary line counts it: computed + fresh + untargeted calls
    fallbacks: int = 0
    refused: int = 0
    peak_bytes: int = 0
    budget_mb: float = 0.0
    # encoder (EncoderPropagationRun, its config and engine)
    preset: str = ""  # "uniform k=3", "paper", ...
    parallel_decoding: bool = False
    max_decoders_per_batch: int = 0
    noise_alpha: float = 0.0  # prior noise injection: on when > 0
    noise_tau: float = 0.0
    key_steps: tuple[int, ...] = ()  # steps that ran the whole U-Net
    model_calls: int = 0
    encoder_passes_saved: int = 0
    decoder_batches: int = 0
    decoded_steps: int = 0
    largest_batch: int = 0
    served_from_parallel: int = 0
    stats: object = field(default=None, compare=False, repr=False)  # ReuseStats / PropagationStats

    @property
    def memory_mib(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def noise_injection(self) -> bool:
        return self.noise_alpha > 0


def attention_records(runs) -> list[RunRecord]:
    """Records of an ending ``AttentionRuns``: one per device that ran, in the order of its summary lines."""
    schedule = runs.schedule
    records = []
    for device, run in runs.by_device.items():
        stats = run.stats
        records.append(
            RunRecord(
                node=ATTENTION,
                steps=schedule.steps,
                reused_steps=len(stats.steps_reused),
                device=device,
                schedule=str(schedule),
                mode=run.config.mode,
                layers=len(stats.layers),
                calls_reused=stats.reused,
                stored=stats.stored,
                computed=stats.computed + stats.fresh + stats.untargeted,
                fallbacks=stats.fallbacks,
                refused=stats.refused,
                peak_bytes=run.cache.peak_bytes,
                budget_mb=float(run.config.memory_budget_mb),
                stats=stats,
            )
        )
    return records


def encoder_record(run) -> RunRecord:
    """The record of an ending ``EncoderPropagationRun``."""
    stats = run.engine.stats
    spec = run.config.key_steps
    key_steps = tuple(sorted(stats.full_steps))
    return RunRecord(
        node=ENCODER,
        steps=run.plan.steps,
        reused_steps=run.plan.steps - len(key_steps),
        preset=spec.label,
        parallel_decoding=run.config.parallel_decoding,
        max_decoders_per_batch=run.config.max_decoders_per_batch,
        noise_alpha=run.config.injection.alpha,
        noise_tau=run.config.injection.tau,
        key_steps=key_steps,
        model_calls=stats.full_passes + stats.encoder_passes_saved,
        encoder_passes_saved=stats.encoder_passes_saved,
        decoder_batches=stats.decoder_batches,
        decoded_steps=stats.decoded_steps,
        largest_batch=stats.largest_batch,
        served_from_parallel=stats.stored_predictions_used,
        stats=stats,
    )


class RunRecorder:
    """Context manager (and the ``runs`` fixture of ``conftest.py``): every run either node ends while it is active.

    ``records`` in the order the runs ended (the order of the summary lines); ``attention`` / ``encoder`` those
    of one node; ``last(node)`` the latest; ``one()`` the only one; ``clear()`` forgets them.
    """

    _active: ClassVar[list[RunRecorder]] = []
    _originals: ClassVar[dict[type, object]] = {}  # wrapped class -> its own reset
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self):
        self.records: list[RunRecord] = []

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def attention(self) -> list[RunRecord]:
        return [r for r in self.records if r.node == ATTENTION]

    @property
    def encoder(self) -> list[RunRecord]:
        return [r for r in self.records if r.node == ENCODER]

    def last(self, node: str = ATTENTION) -> RunRecord:
        records = [r for r in self.records if r.node == node]
        assert records, f"no {node} run ended while recording"
        return records[-1]

    def one(self) -> RunRecord:
        assert len(self.records) == 1, f"expected exactly one run record for one sampler run: {self.records}"
        return self.records[0]

    def clear(self) -> None:
        self.records.clear()

    # ------------------------------------------------------------------------------------------- recording
    def _record_attention(self, runs) -> None:
        self.records.extend(attention_records(runs))

    def _record_encoder(self, run) -> None:
        self.records.append(encoder_record(run))

    def __enter__(self) -> RunRecorder:
        load_pack()
        with self._lock:
            self._active.append(self)
            self._wrap_loaded_copies()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._active.remove(self)
            if not self._active:
                for cls, original in self._originals.items():
                    cls.reset = original
                self._originals.clear()

    @classmethod
    def _wrap_loaded_copies(cls) -> None:
        """Wrap ``reset`` of the run classes of every loaded copy of the pack (each wrapped once)."""
        for name, module in list(sys.modules.items()):
            if not name.endswith(("attention_hooks", "encoder_hooks")) or not getattr(module, "__file__", None):
                continue
            hook = _HOOK_FILES.get(Path(module.__file__).resolve())
            if hook is None:
                continue
            class_name, method = hook
            run_class = getattr(module, class_name)
            if run_class in cls._originals:
                continue
            original = cls._originals[run_class] = run_class.__dict__["reset"]

            def reset(run, _original=original, _method=method):
                for recorder in list(cls._active):
                    getattr(recorder, _method)(run)
                return _original(run)

            run_class.reset = reset
