"""Calibrated reuse schedules: key steps and attention reuse bits chosen per model from one full-compute run.

Both methods reuse, at a later step ``j``, something computed at an earlier *compute step* ``i``: the encoder
features (Encoder Feature Propagation; the compute steps are its key steps) or the attention maps/outputs
(Attention Map Reuse; the steps whose bit is 1). The error a reuse step adds grows with how far the reused
quantity has drifted between ``i`` and ``j``. One full-compute run records that quantity at every step
(``ChangeRecorder``), giving a drift matrix ``d(i, j)``; the schedule is then the solution of

    minimise  sum over steps j of d(k(j), j)    (k(j): the last compute step at or before j; d(j, j) = 0)
    subject to  exactly ``budget`` compute steps, step 0 among them, ``required`` steps among them

solved exactly by dynamic programming over segments (``optimal_compute_steps``; a segment is one compute step
and the reuse steps that follow it, so the cost splits into independent segment costs). Ties go to the earliest
next compute step, so the result is deterministic.

Drift
-----
``d(i, j)`` is the relative L1 change ``mean|f_j - f_i| / mean|f_j|`` averaged over the recorded tensors (a
U-Net's skips and middle output, a transformer's encoder output state, or one entry per attention layer). Each
tensor is kept as a fixed strided subsample of at most ``max_elements`` values, so the matrix is exact for small
tensors and a deterministic estimate for large ones at a few MB for a whole SDXL or Flux run; then every pair is
measured (``pairwise=True``). ``pairwise=False`` keeps only the previous step and uses the sum of consecutive
changes from ``i`` to ``j``, an upper bound of the pairwise L1 distance by the triangle inequality (up to the
normalisation), for hosts where even the subsample per step is too much.

Budget
------
A number of compute steps, or a target speed-up turned into one with the cost of a reuse step relative to a
compute step (``compute_steps_for_speedup``): a run of ``N`` steps with ``K`` compute steps costs
``K + (N - K) * reuse_cost`` compute-step units.

Host-agnostic: never imports ComfyUI or diffusers. Attention probes (``attention_probe``) take q/k/output in the
usual ``[B, heads, tokens, dim]`` layout.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .schedules import ReuseSchedule

# 4096 values per tensor per step: for a 50-step SDXL run with ~70 attention layers and both probes that is ~60 MB
# of fp32 on the CPU, and the relative L1 of a 4096-value strided sample is within a few per cent of the full one.
DEFAULT_MAX_ELEMENTS = 4096
# Query rows of an attention map probe: the map of a strided subset of queries against every key.
DEFAULT_PROBE_ROWS = 16
# First element of the names ``record_attention`` gives: the call's output, or a probe of its map.
ATTENTION_OUTPUT, ATTENTION_MAP = "output", "map"
_EPS = 1e-12


def subsample(tensor: torch.Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """A fixed strided subsample (at most ``max_elements`` values) of ``tensor``, flattened, fp32, on the CPU."""
    flat = tensor.detach().reshape(-1)
    stride = max(1, math.ceil(flat.numel() / max_elements))
    return flat[::stride][:max_elements].float().cpu().clone()


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """``mean|new - old| / mean|new|``: 0 for no change, about 1 when the change is as large as the tensor."""
    return float((new - old).abs().mean() / (new.abs().mean() + _EPS))


def attention_probe(q: torch.Tensor, k: torch.Tensor, rows: int = DEFAULT_PROBE_ROWS) -> torch.Tensor:
    """softmax(q kᵀ/√d) for a strided subset of ``rows`` queries, ``[B, heads, rows, keys]`` (cheap: no full map)."""
    if q.ndim != 4 or k.ndim != 4:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}"
        raise ValueError(f"attention_probe: q and k must be [B, heads, tokens, dim], got {shapes}")
    stride = max(1, q.shape[2] // rows)
    q_rows = q[:, :, ::stride][:, :, :rows].float()
    k_heads = k.float()
    if k_heads.shape[1] != q_rows.shape[1]:  # grouped-query attention: fewer K heads than Q heads
        k_heads = k_heads.repeat_interleave(q_rows.shape[1] // k_heads.shape[1], dim=1)
    return torch.softmax(q_rows @ k_heads.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


class ChangeRecorder:
    """Per step and per named tensor: a subsample (pairwise) or the consecutive change (``pairwise=False``).

    ``record(step, name, tensor)`` may be called in any step order and again for the same step and name (the
    last call wins: e.g. a Heun sampler's second evaluation lands on the next step before the step's own call).
    """

    def __init__(self, max_elements: int = DEFAULT_MAX_ELEMENTS, pairwise: bool = True):
        if not isinstance(max_elements, int) or isinstance(max_elements, bool) or max_elements < 1:
            raise ValueError(f"max_elements: must be an integer >= 1, got {max_elements!r}")
        self.max_elements = max_elements
        self.pairwise = pairwise
        self._samples: dict[int, dict[Hashable, torch.Tensor]] = {}
        self._changes: dict[int, dict[Hashable, float]] = {}  # pairwise=False: change from the previous step
        self._last: dict[Hashable, tuple[int, torch.Tensor]] = {}

    def record(self, step: int, name: Hashable, tensor: torch.Tensor) -> None:
        sample = subsample(tensor, self.max_elements)
        if self.pairwise:
            self._samples.setdefault(step, {})[name] = sample
            return
        previous = self._last.get(name)
        if previous is not None and previous[0] == step - 1 and previous[1].shape == sample.shape:
            self._changes.setdefault(step, {})[name] = relative_l1(sample, previous[1])
        if previous is None or previous[0] <= step:
            self._last[name] = (step, sample)
        self._changes.setdefault(step, {})

    def record_features(self, step: int, features, key: tuple = ()) -> None:
        """An encoder pass's ``EncoderFeatures``: every skip, the middle state and every stream, named after ``key``."""
        for i, skip in enumerate(features.skips):
            self.record(step, (*key, "skip", i), skip)
        self.record(step, (*key, "middle"), features.middle)
        for name, value in features.streams.items():
            self.record(step, (*key, "stream", name), value)

    def record_attention(self, step: int, key: tuple, q: torch.Tensor, k: torch.Tensor, out: torch.Tensor) -> None:
        """One attention call (q/k as ``[B, heads, tokens, dim]``): its output and a probe of its map."""
        self.record(step, (ATTENTION_OUTPUT, *key), out)
        self.record(step, (ATTENTION_MAP, *key), attention_probe(q, k))

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted(self._samples if self.pairwise else self._changes))

    def names(self, kind: str | None = None) -> set[Hashable]:
        """The recorded tensor names; with ``kind`` only ``record_attention``'s of that kind."""
        names = {n for per_step in self._samples.values() for n in per_step} if self.pairwise else set(self._last)
        return names if kind is None else {n for n in names if isinstance(n, tuple) and n[:1] == (kind,)}

    def drift(self, steps: int, names: Iterable[Hashable] | None = None) -> list[list[float]]:
        """The ``steps`` x ``steps`` drift matrix (``d[i][j]`` for ``i <= j``; the lower triangle is 0).

        ``names`` restricts it to some recorded tensors (e.g. only attention outputs). Every step must have been
        recorded: a schedule cannot be fitted to steps the run never showed.
        """
        missing = [s for s in range(steps) if s not in (self._samples if self.pairwise else self._changes)]
        if missing:
            raise ValueError(
                f"calibration: steps {missing[:10]}{' ...' if len(missing) > 10 else ''} were never recorded; "
                f"the run must reach every one of its {steps} steps at full compute"
            )
        wanted = set(self.names() if names is None else names)
        if not wanted:
            raise ValueError("calibration: nothing was recorded (no tensor names match)")
        if not self.pairwise:
            changes = [0.0] + [_mean(v for n, v in self._changes[s].items() if n in wanted) for s in range(1, steps)]
            return drift_from_consecutive(changes)
        total = torch.zeros(steps, steps, dtype=torch.float64)
        count = torch.zeros(steps, steps, dtype=torch.float64)
        for name in wanted:
            present = [s for s in range(steps) if name in self._samples[s]]
            shapes = {self._samples[s][name].shape for s in present}
            if len(present) < 2 or len(shapes) != 1:
                continue  # a tensor seen at one step only, or whose size changed, measures no drift
            stacked = torch.stack([self._samples[s][name] for s in present]).double()  # [P, E]
            norm = stacked.abs().mean(-1) + _EPS
            # rel[a, b] = mean|f_b - f_a| / mean|f_b|, one row at a time (a [P, P, E] block can be 100s of MB)
            rel = torch.stack([(stacked - stacked[a]).abs().mean(-1) / norm for a in range(len(present))])
            index = torch.tensor(present)
            total[index[:, None], index[None, :]] += rel
            count[index[:, None], index[None, :]] += 1
        mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).triu(1)
        return mean.tolist()


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def drift_from_consecutive(changes: Sequence[float]) -> list[list[float]]:
    """Drift bound from consecutive changes: ``d[i][j] = changes[i+1] + ... + changes[j]`` (``changes[0]`` unused)."""
    n = len(changes)
    prefix = [0.0] * n
    for s in range(1, n):
        prefix[s] = prefix[s - 1] + float(changes[s])
    return [[prefix[j] - prefix[i] if j > i else 0.0 for j in range(n)] for i in range(n)]


@dataclass(frozen=True)
class ComputeSteps:
    """An optimal set of compute steps and its total drift cost."""

    steps: tuple[int, ...]
    cost: float

    def schedule(self, steps: int) -> ReuseSchedule:
        """As an attention schedule of ``steps`` steps: 1 at the compute steps."""
        return ReuseSchedule(tuple(int(i in self.steps) for i in range(steps)))


def schedule_cost(
    drift: Sequence[Sequence[float]], compute_steps: Iterable[int], weights: Sequence[float] | None = None
) -> float:
    """Sum over steps of the (weighted) drift from each step's last compute step (the DP's objective)."""
    keys = set(compute_steps)
    total, source = 0.0, 0
    for j in range(len(drift)):
        if j in keys:
            source = j
        total += (1.0 if weights is None else weights[j]) * drift[source][j] if j > source else 0.0
    return total


def sigma_step_weights(sigmas: Sequence[float]) -> list[float]:
    """Per step ``sigma_i - sigma_(i+1)`` (``sigmas``: steps + 1 values, descending; ComfyUI's sample_sigmas).

    A prediction error at step ``i`` moves the final sample by about that much (the sampler adds the prediction times
    the sigma step, in the VE / flow parameterisation ComfyUI's sigmas are in), so weighting the drift with it turns
    "how much did the features change" into "how much does that change reach the output"."""
    if len(sigmas) < 2:
        raise ValueError(f"sigmas: need steps + 1 values, got {len(sigmas)}")
    return [abs(float(sigmas[i]) - float(sigmas[i + 1])) for i in range(len(sigmas) - 1)]


def _check_drift(drift: Sequence[Sequence[float]]) -> int:
    n = len(drift)
    if n < 1 or any(len(row) != n for row in drift):
        raise ValueError(f"drift: must be a non-empty square matrix (one row and column per step), got {n} rows")
    for i in range(n):
        for j in range(i + 1, n):
            value = drift[i][j]
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"drift: d[{i}][{j}] = {value!r}; drifts must be finite and >= 0")
    return n


def optimal_compute_steps(
    drift: Sequence[Sequence[float]],
    budget: int,
    required: Iterable[int] = (),
    weights: Sequence[float] | None = None,
) -> ComputeSteps:
    """Exactly ``budget`` compute steps (step 0 and ``required`` among them) of least total drift, each step's drift
    times ``weights[step]`` where given (e.g. ``sigma_step_weights``); O(budget N²)."""
    n = _check_drift(drift)
    if weights is not None and (len(weights) != n or any(not math.isfinite(float(w)) or float(w) < 0 for w in weights)):
        raise ValueError(f"weights: need one finite weight >= 0 per step ({n}), got {list(weights)[:8]}...")
    weight = [1.0] * n if weights is None else [float(w) for w in weights]
    must = {0} | {int(s) for s in required if 0 <= int(s) < n}
    if not isinstance(budget, int) or isinstance(budget, bool) or not len(must) <= budget <= n:
        raise ValueError(
            f"budget: the number of compute steps must be an integer from {len(must)} (step 0 and the steps that "
            f"must compute) to {n} (every step), got {budget!r}"
        )
    # seg[s][t]: cost of the segment that starts at compute step s and ends before the next compute step t.
    seg = [[0.0] * (n + 1) for _ in range(n)]
    for s in range(n):
        for t in range(s + 1, n + 1):
            seg[s][t] = seg[s][t - 1] + (weight[t - 1] * drift[s][t - 1] if t - 1 > s else 0.0)
    # next_must[s]: the first required step after s (a segment from s may not run past it).
    next_must = [n] * n
    upcoming = n
    for s in range(n - 1, -1, -1):
        next_must[s] = upcoming
        if s in must:
            upcoming = s
    inf = math.inf
    # best[m][s]: least cost of steps s..n-1 with exactly m compute steps, s being one of them.
    best = [[inf] * n for _ in range(budget + 1)]
    choice = [[n] * n for _ in range(budget + 1)]
    for s in range(n):
        if next_must[s] == n:
            best[1][s] = seg[s][n]
    for m in range(2, budget + 1):
        for s in range(n - m, -1, -1):
            value, pick = inf, n
            for t in range(s + 1, min(next_must[s], n - m + 1) + 1):
                if t >= n:
                    break
                candidate = seg[s][t] + best[m - 1][t]
                if candidate < value:  # strict: the earliest next compute step wins ties
                    value, pick = candidate, t
            best[m][s], choice[m][s] = value, pick
    if not math.isfinite(best[budget][0]):
        raise ValueError(f"budget: {budget} compute steps cannot include all required steps {sorted(must)}")
    steps, s = [0], 0
    for m in range(budget, 1, -1):
        s = choice[m][s]
        steps.append(s)
    return ComputeSteps(tuple(steps), best[budget][0])


def compute_steps_for_speedup(steps: int, speedup: float, reuse_cost: float) -> int:
    """Most compute steps whose run is at least ``speedup`` times faster than full compute.

    ``reuse_cost``: the time of a reuse step over a compute step (Encoder Feature Propagation: the decoder's share
    of the model; Attention Map Reuse: a step without attention over one with it).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: a run needs at least one step, got {steps!r}")
    if not math.isfinite(speedup) or speedup < 1.0:
        raise ValueError(f"target: a speed-up must be >= 1 (1 = full compute), got {speedup!r}")
    if not math.isfinite(reuse_cost) or not 0.0 <= reuse_cost < 1.0:
        raise ValueError(
            f"reuse cost: a reuse step's cost relative to a compute step must lie in [0, 1), got {reuse_cost!r}"
        )
    # K + (N - K) r <= N / s  <=>  K <= N (1/s - r) / (1 - r); the tiny slack absorbs float rounding at exact fits.
    limit = steps * (1.0 / speedup - reuse_cost) / (1.0 - reuse_cost)
    count = min(steps, math.floor(limit + 1e-9))
    if count < 1:
        fastest = steps / (1 + (steps - 1) * reuse_cost)
        raise ValueError(
            f"target: a {speedup:g}x speed-up is out of reach with a reuse step costing {reuse_cost:g} of a compute "
            f"step; the fastest schedule ({steps} steps, only step 0 computed) gives {fastest:.2f}x"
        )
    return count


@dataclass(frozen=True)
class Budget:
    """How many steps to reuse, or which speed-up to reach (then ``reuse_cost`` converts it to a step count)."""

    reuse_steps: int | None = None
    speedup: float | None = None

    def __post_init__(self):
        if (self.reuse_steps is None) == (self.speedup is None):
            raise ValueError("target: give either a number of reused steps or a speed-up, not both or neither")
        if self.reuse_steps is not None and (
            not isinstance(self.reuse_steps, int) or isinstance(self.reuse_steps, bool) or self.reuse_steps < 0
        ):
            raise ValueError(f"target: the number of reused steps must be an integer >= 0, got {self.reuse_steps!r}")

    def compute_steps(self, steps: int, reuse_cost: float) -> int:
        if self.speedup is not None:
            return compute_steps_for_speedup(steps, self.speedup, reuse_cost)
        if self.reuse_steps >= steps:
            raise ValueError(
                f"target: {self.reuse_steps} reused steps leave no compute step in a {steps}-step run; "
                f"reuse at most {steps - 1}"
            )
        return steps - self.reuse_steps


@dataclass(frozen=True)
class CalibratedSchedules:
    """The two schedules of one calibration and what the recorded drift predicts for them."""

    steps: int
    key_steps: tuple[int, ...]
    key_cost: float
    attention: ReuseSchedule
    attention_cost: float
    notes: tuple[str, ...] = field(default=())

    @property
    def key_steps_text(self) -> str:
        return ",".join(str(s) for s in self.key_steps)

    def report(self) -> str:
        lines = [
            f"calibrated for {self.steps} steps",
            f"Encoder Feature Propagation custom_key_steps: {self.key_steps_text} "
            f"({len(self.key_steps)} key steps, drift {self.key_cost:.4g})",
            f"Attention Map Reuse custom_schedule: {self.attention} "
            f"({self.attention.reuse_count} reuse steps, drift {self.attention_cost:.4g})",
        ]
        return "\n".join([*lines, *self.notes])


def calibrate(
    encoder_drift: Sequence[Sequence[float]],
    attention_drift: Sequence[Sequence[float]],
    budget: Budget,
    encoder_reuse_cost: float,
    attention_reuse_cost: float,
    required: Iterable[int] = (),
    weights: Sequence[float] | None = None,
) -> CalibratedSchedules:
    """Both schedules for ``budget`` from the recorded drift matrices of one full run."""
    steps = len(encoder_drift)
    if len(attention_drift) != steps:
        raise ValueError(f"attention drift: {len(attention_drift)} steps, encoder drift {steps}; record one run")
    required = tuple(required)
    keys = optimal_compute_steps(encoder_drift, budget.compute_steps(steps, encoder_reuse_cost), required, weights)
    computes = optimal_compute_steps(
        attention_drift, budget.compute_steps(steps, attention_reuse_cost), required, weights
    )
    return CalibratedSchedules(steps, keys.steps, keys.cost, computes.schedule(steps), computes.cost)
