"""Key-step schedules for encoder feature propagation (Faster Diffusion, Li et al. NeurIPS 2024).

At a *key step* the whole U-Net runs and its encoder features (skips + middle output) are cached; every
other step runs only the decoder on the cached features. Pure functions, no torch, no host.

Presets (``KeyStepSpec.preset``)
--------------------------------
* ``paper``: the paper's non-uniform set for 50 steps, ``{0, 1, 2, 3, 5, 10, 15, 25, 35}``. For ``N`` steps
  (the scaling rule): every key ``k`` maps to ``round_half_up(k * N / 50)``, the first four steps
  ``{0, 1, 2, 3}`` stay keys (the paper's dense early keys: encoder features change fastest at high noise),
  keys ``>= N`` drop out and duplicates merge. 50 steps give the paper's set exactly; 20 steps give
  ``{0, 1, 2, 3, 4, 6, 10, 14}``; 100 steps ``{0, 1, 2, 3, 4, 6, 10, 20, 30, 50, 70}``. Short runs (few-step
  distilled models): at least ``N // 4`` steps stay decoder-only (``PAPER_MIN_DECODED_SHARE``); the latest keys
  beyond that drop. This changes 4 steps (``{0, 1, 2}``) and 5 steps (``{0, 1, 2, 3}``) only, which the rule above
  makes all key steps; every other step count already has that many decoder-only steps. Runs of 1-3 steps keep
  every step (``nothing_to_reuse`` says why).
* ``uniform``: every ``k``-th step, ``{i : i % k == 0}`` (the paper suggests ``k = 4`` for community
  checkpoints); ``k = 1`` makes every step a key step (no reuse).
* ``one_pass``: ``{0}``, the TiUE / "One-Way Ticket" limit case: one encoder pass shared by all decoder steps.
  Meant for distilled loop-free students; it degrades ordinary checkpoints.
* ``custom``: an explicit list such as ``"0,1,2,5,10"`` (commas and/or spaces). Step 0 is always a key step
  (nothing is cached before it); entries ``>= N`` do not apply to an ``N``-step run. A calibrated list
  (``reuse_core.calibration``) is a custom list.
* ``adaptive``: no fixed list. At each step the engine adds up the relative L1 change of the model input since the
  last key step and runs the whole model once that sum reaches ``threshold`` (``PropagationPlan.adaptive_threshold``;
  the rule is in ``encoder_engine``). Threshold 0 makes every step a key step.

Reuse window and full steps
---------------------------
Reuse can be restricted to part of the run (``start_percent`` / ``end_percent`` in the ComfyUI node): steps
outside the window run the whole U-Net. ``PropagationPlan.full_steps`` = key steps plus steps outside the
window; every other step is a decoder-only step. In ``adaptive`` mode ``full_steps`` holds only the steps that must
run in full (step 0 and the steps outside the window); the engine decides the others while sampling.

Parallel decoding groups
------------------------
A decoder-only step never reads the current latent, so the decoder-only steps that follow one full step can
run as one batch. ``group_non_key_steps`` splits each run of consecutive decoder-only steps into batches of
at most ``max_batch`` steps (a memory cap: activation memory grows with the batch). ``adaptive`` plans have no
batches: whether step ``i + 1`` reuses depends on the latent that step ``i`` produces, so decoder-only steps cannot be
known, let alone decoded, ahead of time; adaptive runs decode sequentially whatever ``parallel_decoding`` says.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .steps import MAX_CUSTOM_CHARS

PRESETS = ("paper", "uniform", "one_pass", "custom", "adaptive")
# Node default of the adaptive threshold: on the built-in model (20 DDIM steps) 0.25 gave 6 key steps, 0.1 gave 10.
ADAPTIVE_DEFAULT_THRESHOLD = 0.3
PAPER_KEY_STEPS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)
PAPER_REFERENCE_STEPS = 50
PAPER_DENSE_PREFIX = 4  # steps 0..3 are keys in the paper's set and stay keys wherever the run has room (below)
# Short runs: at least steps // 4 decoder-only steps (4 steps: {0, 1, 2}); binds at 4 and 5 steps only.
PAPER_MIN_DECODED_SHARE = 4
# Keeps huge numbers away from int(), whose own error (over 4300 digits) would not name the field.
MAX_INDEX_DIGITS = 9


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: a run needs at least one sampling step, got {steps!r}")


def _round_half_up(value: float) -> int:
    # Python's round() rounds half to even (round(2.5) == 2); the rule is stated as half-up.
    return math.floor(value + 0.5)


def paper_key_steps(steps: int) -> tuple[int, ...]:
    """The paper's 50-step key set scaled to ``steps`` (rule in the module docstring)."""
    _check_steps(steps)
    scaled = {_round_half_up(k * steps / PAPER_REFERENCE_STEPS) for k in PAPER_KEY_STEPS_50}
    dense = set(range(min(PAPER_DENSE_PREFIX, steps)))
    keys = sorted(s for s in scaled | dense if s < steps)
    return tuple(keys[: steps - steps // PAPER_MIN_DECODED_SHARE])


def uniform_key_steps(steps: int, k: int) -> tuple[int, ...]:
    """Every ``k``-th step starting at 0."""
    _check_steps(steps)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"uniform_k: must be an integer >= 1 (1 = every step is a key step), got {k!r}")
    return tuple(range(0, steps, k))


def one_pass_key_steps(steps: int) -> tuple[int, ...]:
    """TiUE: one encoder pass (step 0) for the whole run."""
    _check_steps(steps)
    return (0,)


def parse_key_step_list(text: str, field: str = "custom_key_steps") -> tuple[int, ...]:
    """Parse ``"0,1,2,5,10"`` (separators: commas, semicolons, whitespace, brackets) into sorted unique indices.

    Raises ``ValueError`` naming ``field`` for anything that is not a non-negative integer.
    """
    if not isinstance(text, str):
        raise ValueError(f"{field}: expected text such as '0,1,2,5,10', got {type(text).__name__}")
    if len(text) > MAX_CUSTOM_CHARS:
        raise ValueError(
            f"{field}: {len(text)} characters is too long (at most {MAX_CUSTOM_CHARS}); list only the key steps, "
            "e.g. '0,1,2,5,10'"
        )
    tokens = [t for t in re.split(r"[\s,;\[\]()]+", text) if t]
    if not tokens:
        raise ValueError(f"{field}: empty; give 0-based step indices such as '0,1,2,5,10'")
    steps = set()
    for token in tokens:
        if not re.fullmatch(r"\d+", token):
            raise ValueError(
                f"{field}: {_preview(token)} is not a non-negative integer step index; write e.g. '0,1,2,5,10'"
            )
        digits = token.lstrip("0") or "0"  # int() counts leading zeros against its digit limit too
        if len(digits) > MAX_INDEX_DIGITS:
            raise ValueError(
                f"{field}: step index {_preview(token)} ({len(token)} digits) is far beyond any run's step count; "
                "give 0-based indices below the sampler's steps, e.g. '0,1,2,5,10'"
            )
        steps.add(int(digits))
    return tuple(sorted(steps))


def _preview(token: str, limit: int = 12) -> str:
    # An error message quotes the offending entry, but not all of a pasted megabyte.
    return repr(token) if len(token) <= limit else repr(token[:limit] + "…")


@dataclass(frozen=True)
class KeyStepSpec:
    """Which steps are key steps, independent of the run length (resolved by ``key_steps(steps)``)."""

    preset: str = "paper"
    k: int = 4
    custom: tuple[int, ...] = ()
    threshold: float = 0.0  # adaptive only: accumulated relative input change that triggers a key step

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"key_steps: unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"uniform_k: must be an integer >= 1, got {self.k!r}")
        custom = tuple(self.custom)
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in custom):
            raise ValueError(f"custom_key_steps: step indices must be non-negative integers, got {custom}")
        object.__setattr__(self, "custom", tuple(sorted(set(custom))))
        if self.preset == "custom" and not self.custom:
            raise ValueError("custom_key_steps: the 'custom' preset needs a list such as '0,1,2,5,10'")
        t = self.threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ValueError(
                f"adaptive_threshold: must be a finite number >= 0 (0 = every step a key step; try 0.1-0.5), got {t!r}"
            )

    @classmethod
    def from_inputs(cls, preset: str, k: int = 4, custom_text: str = "", threshold: float = 0.0) -> KeyStepSpec:
        """Build from UI values; the custom list is parsed (and validated) only for the ``custom`` preset."""
        custom = parse_key_step_list(custom_text) if preset == "custom" else ()
        return cls(preset=preset, k=k, custom=custom, threshold=threshold)

    @property
    def adaptive(self) -> bool:
        return self.preset == "adaptive"

    @property
    def label(self) -> str:
        """The preset as log lines name it."""
        if self.preset == "uniform":
            return f"uniform k={self.k}"
        if self.adaptive:
            return f"adaptive threshold={self.threshold:g}"
        return self.preset

    def key_steps(self, steps: int) -> tuple[int, ...]:
        _check_steps(steps)
        if self.preset == "paper":
            return paper_key_steps(steps)
        if self.preset == "uniform":
            return uniform_key_steps(steps, self.k)
        if self.preset in ("one_pass", "adaptive"):  # adaptive: only step 0 is known before sampling
            return one_pass_key_steps(steps)
        return tuple(sorted({0} | {s for s in self.custom if s < steps}))

    def beyond(self, steps: int) -> tuple[int, ...]:
        """Custom entries that a ``steps``-step run drops (indices ``>= steps``); empty for the other presets."""
        return tuple(s for s in self.custom if s >= steps) if self.preset == "custom" else ()

    def nothing_to_reuse(self, steps: int) -> str:
        """Why this preset leaves no decoder-only step in a ``steps``-step run, or ``""`` when it leaves one (an
        adaptive run decides while sampling: ``""`` from 2 steps on)."""
        keys = self.key_steps(steps)
        if steps == 1:
            return "a 1-step run has no step after its first"
        if len(keys) < steps or self.adaptive:
            return ""
        last = f"steps 0-{steps - 1}"
        if self.preset == "paper":
            return f"paper keeps {last} (runs of under {PAPER_MIN_DECODED_SHARE} steps keep every step)"
        if self.preset == "uniform":
            return f"uniform k={self.k} makes every step a key step"
        return f"custom_key_steps list every step of the run ({last})"


def reuse_window(step_sigmas: Sequence[float], start_sigma: float, end_sigma: float) -> tuple[bool, ...]:
    """Per step: may it reuse? ``end_sigma < sigma_i <= start_sigma`` (ComfyUI's percent convention:
    ``start_sigma = percent_to_sigma(start_percent)``, ``end_sigma = percent_to_sigma(end_percent)``)."""
    return tuple(end_sigma < float(s) <= start_sigma for s in step_sigmas)


def reuse_window_by_position(steps: int, start_percent: float, end_percent: float) -> tuple[bool, ...]:
    """Per step: may it reuse? ``start_percent <= i / steps < end_percent``; for hosts without sigmas."""
    _check_steps(steps)
    return tuple(start_percent <= i / steps < end_percent for i in range(steps))


def group_non_key_steps(steps: int, full_steps: Iterable[int], max_batch: int) -> tuple[tuple[int, ...], ...]:
    """Batches of consecutive decoder-only steps, each at most ``max_batch`` long, in step order."""
    _check_steps(steps)
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError(f"max_decoders_per_batch: must be an integer >= 1, got {max_batch!r}")
    full = set(full_steps)
    batches: list[tuple[int, ...]] = []
    current: list[int] = []
    for i in range(steps):
        if i in full:
            if current:
                batches.append(tuple(current))
                current = []
            continue
        current.append(i)
        if len(current) == max_batch:
            batches.append(tuple(current))
            current = []
    if current:
        batches.append(tuple(current))
    return tuple(batches)


@dataclass(frozen=True)
class PropagationPlan:
    """The resolved per-run schedule: which steps run the whole U-Net and how decoder-only steps batch."""

    steps: int
    full_steps: frozenset[int]
    decode_batches: tuple[tuple[int, ...], ...]
    adaptive_threshold: float | None = None  # set: the engine picks key steps among the other steps while sampling

    def __post_init__(self):
        _check_steps(self.steps)
        if 0 not in self.full_steps:
            raise ValueError("plan: step 0 must run the whole U-Net (nothing is cached before it)")

    def is_full(self, step: int) -> bool:
        """Whole U-Net at ``step``? Steps outside the schedule (rounding, odd samplers) always run in full."""
        return step < 0 or step >= self.steps or step in self.full_steps

    def batch_from(self, step: int) -> tuple[int, ...]:
        """The decode batch holding ``step``, from ``step`` on; ``(step,)`` for a full step."""
        for batch in self.decode_batches:
            if step in batch:
                return batch[batch.index(step) :]
        return (step,)

    @property
    def decoder_only_steps(self) -> int:
        return self.steps - len(self.full_steps)


def make_plan(
    spec: KeyStepSpec, steps: int, window: Sequence[bool] | None = None, max_batch: int = 4
) -> PropagationPlan:
    """Resolve ``spec`` for a ``steps``-step run; ``window[i]`` False forces step ``i`` to run in full."""
    keys = spec.key_steps(steps)
    if window is not None and len(window) != steps:
        raise ValueError(f"window: needs one flag per step ({steps}), got {len(window)}")
    outside = {i for i in range(steps) if window is not None and not window[i]}
    full = frozenset(set(keys) | outside)
    if spec.adaptive:
        group_non_key_steps(steps, full, max_batch)  # still validates max_batch
        return PropagationPlan(steps, full, (), adaptive_threshold=float(spec.threshold))
    return PropagationPlan(steps, full, group_non_key_steps(steps, full, max_batch))
