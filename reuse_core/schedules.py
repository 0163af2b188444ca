"""Per-step compute/reuse schedules for attention reuse (Hunter et al. 2024, HURRY / PHAST).

A schedule holds one bit per sampling step, the same for every layer: ``1`` = compute attention,
``0`` = reuse what the last compute step produced. Step 0 always computes (nothing to reuse yet).

Strategies
----------
* ``hurry(steps, reuse)``: compute the first ``steps - reuse`` steps, reuse the last computed maps for the
  final ``reuse`` steps.
* ``phast_preset(steps, reuse)``: the paper's PHAST search results where the paper has them
  (20 steps / 10 reuse: ``11111111010001000000``; 10 steps / 3 reuse, exhaustive search with DPM++:
  ``1111110100``). For other sizes the 20/10 result is rescaled by its single swap: PHAST found HURRY plus
  one swap (the compute at ``steps - reuse - 2`` became a reuse, a compute appeared ``round(0.3 * reuse)``
  steps into the reuse tail); the rule applies that swap at the same relative place. Where the swap does not
  fit (``reuse < 2`` or fewer than 3 compute steps) the preset is plain HURRY.
* ``parse_bits("11111111010001000000")``: a custom schedule; spaces, commas, ``_``, ``|`` and brackets are
  ignored, any other character is a ``ValueError`` naming the field.

Reuse amount: an integer count of steps, or a fraction of the run's steps (``round(fraction * steps)``).

Schedule length vs the steps actually run (the rule)
----------------------------------------------------
The node does not know how many steps a sampler will run (img2img, KSamplerAdvanced start/end, a custom
sigma list), so a ``ScheduleSpec`` is resolved against the run's real step count ``len(sample_sigmas) - 1``
when sampling starts. Every sampler run (each KSamplerAdvanced segment) is resolved on its own; maps never
cross runs.

* HURRY / PHAST are generated for that step count. A reuse fraction scales with it. An integer reuse count
  is used as is; if it leaves no compute step (``reuse >= steps``, e.g. the default 10 on an 8-step distilled model)
  half the run reuses instead and ``ResolvedSchedule.note`` says so (the node logs it), naming
  ``reuse_steps`` (lower it or use ``reuse_fraction``). ``denoise < 1`` in KSampler still runs ``steps`` steps.
* A custom bit string of the same length is used as is. Of another length it is resampled by relative
  position (run step ``i`` takes bit ``floor((i + 0.5) * L / steps)``, step 0 forced to compute), so a
  20-bit schedule keeps its shape on a 10- or 30-step run; ``ResolvedSchedule.note`` says so and the node
  logs it. The reuse count may change under resampling.
* A run whose schedule reuses at no step (too few steps, a reuse fraction that rounds to 0, ...) runs as the
  unpatched model; ``ScheduleSpec.nothing_to_reuse`` says why, for the node's log line.
* Samplers that evaluate the model at sigmas of their own instead of the run's (ComfyUI's ``dpm_fast`` and
  ``dpm_adaptive``) meet no step after step 0, so no schedule bit applies to them; ``StepCoverage`` notices
  (for both nodes' log lines).

Which compute steps materialise maps
------------------------------------
Reuse step ``j`` uses the output of the last compute step ``i < j``. So a compute step must store
(materialise the map, or keep the output) only when the step right after it reuses; every other compute step
runs the host's normal fused attention. See ``ReuseSchedule.store_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .steps import MAX_CUSTOM_CHARS

STRATEGIES = ("hurry", "phast", "custom")

# Paper results (Hunter et al. 2024): (steps, reuse) -> bits.
PHAST_RESULTS: dict[tuple[int, int], tuple[int, ...]] = {
    (20, 10): (1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0),
    (10, 3): (1, 1, 1, 1, 1, 1, 0, 1, 0, 0),
}
# Where PHAST put its extra compute step in the 20/10 result: 3 steps into a 10-step reuse tail.
PHAST_TAIL_OFFSET = 0.3

_IGNORED_CHARS = set(" \t\n\r,_|[]()")


@dataclass(frozen=True)
class ReuseSchedule:
    """One bit per step (1 = compute, 0 = reuse the last computed attention)."""

    bits: tuple[int, ...]

    def __post_init__(self):
        bits = tuple(int(b) for b in self.bits)
        object.__setattr__(self, "bits", bits)
        if not bits:
            raise ValueError("schedule: needs at least one step")
        if any(b not in (0, 1) for b in bits):
            raise ValueError(f"schedule: bits must be 0 or 1, got {bits}")
        if bits[0] != 1:
            raise ValueError("schedule: step 0 must compute (1): there is nothing to reuse before it")

    @property
    def steps(self) -> int:
        return len(self.bits)

    @property
    def reuse_count(self) -> int:
        return self.bits.count(0)

    def computes(self, step: int) -> bool:
        return self.bits[step] == 1

    def source_step(self, step: int) -> int:
        """The compute step whose attention step ``step`` uses (itself when it computes)."""
        while self.bits[step] == 0:
            step -= 1
        return step

    def sources(self, history: int = 1) -> tuple[tuple[int, ...], ...]:
        """Per step: the last ``history`` compute steps at or before it, oldest first (fewer near the start);
        a reuse step forecasts from them (``reuse_core.forecast``), the last one is ``source_step``."""
        out, last = [], ()
        for i, bit in enumerate(self.bits):
            if bit:
                last = (*last, i)[-history:]
            out.append(last)
        return tuple(out)

    def store_steps(self, history: int = 1) -> tuple[bool, ...]:
        """Per step: must this compute step materialise its maps (or keep its output) for a later reuse? With
        ``history`` > 1 (a forecast), also the compute steps a later reuse step forecasts from."""
        store = [False] * len(self.bits)
        for bit, sources in zip(self.bits, self.sources(history), strict=True):
            if not bit:
                for i in sources:
                    store[i] = True
        return tuple(store)

    def __str__(self) -> str:
        return "".join(str(b) for b in self.bits)


def parse_bits(text: str, field: str = "custom_schedule") -> ReuseSchedule:
    """Parse ``"11111111010001000000"`` (spaces, commas, brackets tolerated) into a schedule."""
    if not isinstance(text, str):
        raise ValueError(f"{field}: expected a string of 0/1 characters, got {type(text).__name__}")
    if len(text) > MAX_CUSTOM_CHARS:
        raise ValueError(
            f"{field}: {len(text)} characters is too long (at most {MAX_CUSTOM_CHARS}); give one 0/1 per step "
            "(a schedule of another length is resampled to the run), e.g. 11111111010001000000"
        )
    bits = []
    for pos, char in enumerate(text):
        if char in _IGNORED_CHARS:
            continue
        if char not in "01":
            raise ValueError(
                f"{field}: invalid character {char!r} at position {pos}; use only 1 (compute) and 0 (reuse), "
                "e.g. 11111111010001000000"
            )
        bits.append(int(char))
    if not bits:
        raise ValueError(f"{field}: empty; give one 0/1 per step, e.g. 11111111010001000000")
    if bits[0] != 1:
        raise ValueError(f"{field}: must start with 1 (step 0 has no earlier attention to reuse)")
    return ReuseSchedule(tuple(bits))


def reuse_count(steps: int, reuse_steps: int = 0, reuse_fraction: float = 0.0) -> int:
    """Reuse steps for a run of ``steps``: ``round(reuse_fraction * steps)`` if the fraction is > 0,
    else ``reuse_steps``. Raises when no compute step would remain."""
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    if reuse_fraction < 0 or reuse_fraction >= 1:
        raise ValueError(f"reuse_fraction: must be in [0, 1), got {reuse_fraction}")
    if reuse_steps < 0:
        raise ValueError(f"reuse_steps: must be >= 0, got {reuse_steps}")
    if reuse_fraction > 0:
        return min(round(reuse_fraction * steps), steps - 1)
    if reuse_steps >= steps:
        raise ValueError(
            f"reuse_steps: {reuse_steps} reuse steps leave no compute step in this {steps}-step run; "
            f"set reuse_steps below {steps} or use reuse_fraction"
        )
    return reuse_steps


def hurry(steps: int, reuse: int) -> ReuseSchedule:
    """HURRY(r): compute the first ``steps - reuse`` steps, reuse for the last ``reuse``."""
    if not 0 <= reuse < steps:
        raise ValueError(f"reuse_steps: must be in [0, {steps - 1}] for {steps} steps, got {reuse}")
    return ReuseSchedule((1,) * (steps - reuse) + (0,) * reuse)


def phast_preset(steps: int, reuse: int) -> ReuseSchedule:
    """The paper's PHAST result, or the rescaled 20/10 swap for other sizes (see the module docstring)."""
    if (steps, reuse) in PHAST_RESULTS:
        hurry(steps, reuse)  # validates the sizes
        return ReuseSchedule(PHAST_RESULTS[(steps, reuse)])
    return phast_rescaled(steps, reuse)


def phast_rescaled(steps: int, reuse: int) -> ReuseSchedule:
    """HURRY plus the 20/10 PHAST swap placed at the same relative position (the rescaling rule)."""
    base = hurry(steps, reuse)
    head = steps - reuse
    if reuse < 2 or head < 3:
        return base
    bits = list(base.bits)
    bits[head - 2] = 0
    bits[head + max(1, round(PHAST_TAIL_OFFSET * reuse))] = 1
    return ReuseSchedule(tuple(bits))


def resample(schedule: ReuseSchedule, steps: int) -> ReuseSchedule:
    """Resample a schedule to ``steps`` by relative position (step 0 stays a compute step)."""
    length = schedule.steps
    if steps == length:
        return schedule
    bits = [schedule.bits[min(length - 1, math.floor((i + 0.5) * length / steps))] for i in range(steps)]
    bits[0] = 1
    return ReuseSchedule(tuple(bits))


@dataclass(frozen=True)
class ResolvedSchedule:
    schedule: ReuseSchedule
    note: str = ""  # non-empty when the schedule was rescaled to fit the run


@dataclass(frozen=True)
class ScheduleSpec:
    """What the user asked for; ``resolve(steps)`` turns it into a schedule for one run.

    Validated on construction (node execution time), so a bad custom string fails before sampling.
    """

    strategy: str = "phast"
    reuse_steps: int = 10
    reuse_fraction: float = 0.0
    custom_schedule: str = ""

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if int(self.reuse_steps) != self.reuse_steps or self.reuse_steps < 0:
            raise ValueError(f"reuse_steps: must be a whole number >= 0, got {self.reuse_steps}")
        if not 0 <= self.reuse_fraction < 1:
            raise ValueError(f"reuse_fraction: must be in [0, 1) (0 = use reuse_steps), got {self.reuse_fraction}")
        if self.strategy == "custom":
            parse_bits(self.custom_schedule)

    def resolve(self, steps: int) -> ResolvedSchedule:
        if self.strategy == "custom":
            written = parse_bits(self.custom_schedule)
            if written.steps == steps:
                return ResolvedSchedule(written)
            fitted = resample(written, steps)
            note = f"custom_schedule has {written.steps} bits, run has {steps} steps: resampled to {fitted}"
            return ResolvedSchedule(fitted, note)
        build = hurry if self.strategy == "hurry" else phast_preset
        if self.reuse_fraction == 0 and self.reuse_steps >= steps >= 1:
            # Typically the default 10 on a few-step (distilled) model: half the run, as 10 of 20, not a failed run.
            reuse = steps // 2
            note = (
                f"reuse_steps {self.reuse_steps} leaves no compute step in this {steps}-step run: reusing {reuse} "
                f"(half the run, as 10 of 20); set reuse_steps below {steps} or use reuse_fraction"
            )
            return ResolvedSchedule(build(steps, reuse), note if reuse else "")
        return ResolvedSchedule(build(steps, reuse_count(steps, self.reuse_steps, self.reuse_fraction)))

    def nothing_to_reuse(self, resolved: ResolvedSchedule) -> str:
        """Why ``resolved`` (this spec resolved for a run) reuses at no step, or ``""`` when it reuses at one."""
        schedule = resolved.schedule
        steps = schedule.steps
        if schedule.reuse_count:
            return ""
        if steps == 1:
            return "a 1-step run has no step after its first"
        if self.strategy == "custom":
            if resolved.note:
                return f"custom_schedule resampled to {steps} steps ({schedule}) has no 0 (reuse) bit"
            return "custom_schedule has no 0 (reuse) bit"
        if self.reuse_fraction > 0:
            return f"reuse_fraction {self.reuse_fraction:g} of {steps} steps rounds to 0 reuse steps"
        return "reuse_steps is 0 (reuse off)"

    def describe(self) -> str:
        if self.strategy == "custom":
            return f"custom {self.custom_schedule.strip()}"
        amount = f"{self.reuse_fraction:g} of steps" if self.reuse_fraction > 0 else f"{self.reuse_steps} steps"
        return f"{self.strategy} reuse {amount}"


@dataclass
class StepCoverage:
    """Which of a run's ``steps`` its model calls fell on exactly (by sigma, ``steps.match_step``)."""

    steps: int
    calls: int = 0
    matched: set[int] = field(default_factory=set)

    def record(self, match) -> None:
        """Count one model call; ``match`` is its ``steps.StepMatch`` (None outside a sampler run)."""
        self.calls += 1
        if match is not None and match.exact:
            self.matched.add(match.index)

    @property
    def off_steps(self) -> bool:
        """True when calls were made but none fell on a step after step 0: the sampler picked its own sigmas."""
        return self.steps > 1 and self.calls > 0 and not self.matched - {0}

    def note(self, sampler: str = "") -> str:
        """What ``off_steps`` means, for a log line (``""`` when the calls met the run's steps)."""
        if not self.off_steps:
            return ""
        who = f"sampler {sampler}" if sampler else "the sampler"
        return (
            f"{who} evaluated the model at sigmas of its own, at none of this {self.steps}-step run's steps after "
            "step 0 (dpm_fast and dpm_adaptive pick their own sigmas)"
        )
