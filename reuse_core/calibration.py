"""Calibrated reuse schedules: key steps and attention reuse bits chosen per model from one full-compute run.

Both methods skip, at a later step ``j``, something computed at earlier *compute steps*: the encoder features
(Encoder Feature Propagation; the compute steps are its key steps) or the attention maps/outputs (Attention Map
Reuse; the steps whose bit is 1). A skipped step gets a forecast of order ``k`` (``reuse_core.forecast``): the
polynomial through the last ``k + 1`` compute steps at or before ``j``, at ``j`` (order 0: the last compute step's
value itself, the papers' reuse). One full-compute run records that quantity at every step (``ChangeRecorder``), so
the error of that forecast is known exactly for any set of compute steps:

    e_k(j | c_(m-k), ..., c_m) = relative L1 between the recording at j and the extrapolation (Newton/Lagrange
                                 weights over step indices) of the recordings at those compute steps

(fewer than ``k + 1`` compute steps before ``j``: the order they support, as the engines do). The schedule is the
solution of

    minimise  sum over steps j of w_j e_k(j | the compute steps before j)    (0 at compute steps)
    subject to  exactly ``budget`` compute steps, step 0 among them, ``required`` steps among them

with ``w_j`` the sigma step of ``j`` (``sigma_step_weights``). At order 0 ``e_0(j | i)`` is the drift ``d(i, j)``.

Fit
---
A dynamic programme over segments (``fit_compute_steps``): a segment is one compute step and the skipped steps
after it; its cost depends on that compute step and the ``k`` before it (the forecast's history), so the state is
a compute step with the gaps to its ``k`` predecessors, and the result is exact for the model it solves. Ties go
to the earliest next compute step, so the result is deterministic. What it solves is bounded by ``FitLimits``
(about N * G^(k+1) error evaluations for N steps and gaps of at most G; ``docs/reuse-calibrate.md`` has timings):

* **exact**: every gap, every value. At order 0 while every pair of steps fits ``pair_work``: the drift matrix (one
  L1 distance matrix per tensor), the optimum of ``optimal_compute_steps`` on it (the fit of earlier versions); at
  order >= 1 on short runs;
* **gap-limited**: gaps between compute steps of at most G, the largest that fits (at least 1.5x what the budget
  needs, at order >= 1 at most three times that: longer extrapolations are not worth their cost), every step a
  candidate; errors on a strided subset of the recorded values when ``work`` needs it (at least ``min_elements``
  values per evaluation);
* **coarse**: when even that does not fit (long runs, heavy reuse with a forecast), the same programme on a
  bounded number of evenly spaced candidate positions (plus required steps), each weighing the sigma steps up to
  the next. With few compute steps (at most a quarter of the candidates) they are chosen among the candidates;
  otherwise the coarse schedule gives where compute steps are dense, and the run's compute steps follow that
  density (spread evenly inside each coarse segment).

Drift
-----
``d(i, j)`` is the relative L1 change ``mean|f_j - f_i| / mean|f_j|`` averaged over the recorded tensors (a
U-Net's skips and middle output, a transformer's encoder output state, or one entry per attention layer) present
at both steps. Each tensor is kept as a fixed strided subsample of at most ``max_elements`` values, so the matrix
is exact for small tensors and a deterministic estimate for large ones at a few MB for a whole SDXL or Flux run;
then every pair is measured (``pairwise=True``). ``pairwise=False`` keeps only the previous step and uses the sum
of consecutive changes from ``i`` to ``j``, an upper bound of the pairwise L1 distance by the triangle inequality
(up to the normalisation), for hosts where even the subsample per step is too much (order 0 only).

Budget
------
A number of compute steps, or a target speed-up turned into one with the cost of a reuse step relative to a
compute step (``compute_steps_for_speedup``): a run of ``N`` steps with ``K`` compute steps costs
``K + (N - K) * reuse_cost`` compute-step units.

Host-agnostic: never imports ComfyUI or diffusers. Long fits call ``check()`` (e.g. ComfyUI's interrupt test)
between chunks of work; whatever it raises ends the fit. Attention probes (``attention_probe``) take q/k/output in
the usual ``[B, heads, tokens, dim]`` layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .forecast import FORECASTS
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


def _no_check() -> None:
    pass


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

    def _wanted(self, steps: int, names: Iterable[Hashable] | None) -> set[Hashable]:
        missing = [s for s in range(steps) if s not in (self._samples if self.pairwise else self._changes)]
        if missing:
            raise ValueError(
                f"calibration: steps {missing[:10]}{' ...' if len(missing) > 10 else ''} were never recorded; "
                f"the run must reach every one of its {steps} steps at full compute"
            )
        wanted = set(self.names() if names is None else names)
        if not wanted:
            raise ValueError("calibration: nothing was recorded (no tensor names match)")
        return wanted

    def trajectory(self, steps: int, names: Iterable[Hashable] | None = None) -> Trajectory:
        """The recorded subsamples of ``names`` (default: all) at each of the ``steps`` steps, for exact forecast
        errors (``fit_compute_steps``). Every step must have been recorded; a tensor seen at one step only, or whose
        size changed, measures nothing and is left out."""
        if not self.pairwise:
            raise ValueError("calibration: forecast errors need every step's recorded values (pairwise=True)")
        wanted = self._wanted(steps, names)
        per_step = [self._samples[s] for s in range(steps)]
        shapes: dict[Hashable, set] = {}
        seen: dict[Hashable, int] = {}
        for samples in per_step:
            for name, sample in samples.items():
                if name in wanted:
                    shapes.setdefault(name, set()).add(sample.shape)
                    seen[name] = seen.get(name, 0) + 1
        usable = [n for n, s in shapes.items() if seen[n] >= 2 and len(s) == 1 and next(iter(s)).numel() > 0]
        return Trajectory(per_step, sorted(usable, key=repr))  # repr order: the same sums in every process

    def drift(self, steps: int, names: Iterable[Hashable] | None = None) -> list[list[float]]:
        """The ``steps`` x ``steps`` drift matrix (``d[i][j]`` for ``i <= j``; the lower triangle is 0).

        ``names`` restricts it to some recorded tensors (e.g. only attention outputs). Every step must have been
        recorded: a schedule cannot be fitted to steps the run never showed.
        """
        wanted = self._wanted(steps, names)
        if not self.pairwise:
            changes = [0.0] + [_mean(v for n, v in self._changes[s].items() if n in wanted) for s in range(1, steps)]
            return drift_from_consecutive(changes)
        trajectory = self.trajectory(steps, wanted)
        return _pair_errors(trajectory.rows(range(steps)), _no_check).tolist()


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


# ------------------------------------------------------------------------------------------------ recorded values
@dataclass(frozen=True)
class _Rows:
    """Some steps' recorded values, tensor-major and zero-padded, as a fit measures them."""

    values: torch.Tensor  # [R, T, E] float32: row r's tensor t, its kept values first (zero-padded)
    present: torch.Tensor  # [R, T] bool: tensor t was recorded at row r
    counts: torch.Tensor  # [T] values kept per tensor
    scale: torch.Tensor  # [R, T] mean|value| + eps: a relative L1's denominator at a target row


class Trajectory:
    """The recorded subsamples of some tensors at every step of one run (``ChangeRecorder.trajectory``).

    Holds the recorder's tensors; a fit copies only the rows (steps) and the strided values it measures."""

    def __init__(self, per_step: Sequence[Mapping[Hashable, torch.Tensor]], names: Sequence[Hashable]):
        self._per_step = per_step
        self.names = tuple(names)
        self.sizes = tuple(next(d[n] for d in per_step if n in d).numel() for n in self.names)

    @property
    def steps(self) -> int:
        return len(self._per_step)

    @property
    def elements(self) -> int:
        """Recorded values per step, over all tensors."""
        return sum(self.sizes)

    def rows(self, positions: Iterable[int], stride: int = 1, check: Callable[[], None] = _no_check) -> _Rows:
        """The values at the steps ``positions`` (in that order), every ``stride``-th recorded value of each tensor."""
        positions = list(positions)
        kept = [math.ceil(size / stride) for size in self.sizes]
        values = torch.zeros(len(positions), len(self.names), max(kept, default=1))
        present = torch.zeros(len(positions), len(self.names), dtype=torch.bool)
        scale = torch.full((len(positions), len(self.names)), _EPS)
        for t, name in enumerate(self.names):
            check()
            found = [(r, self._per_step[s][name]) for r, s in enumerate(positions) if name in self._per_step[s]]
            if found:
                index = torch.tensor([r for r, _ in found])
                stacked = torch.stack([sample[::stride] for _, sample in found]).float()
                values[index, t, : kept[t]] = stacked
                present[index, t] = True
                scale[index, t] += stacked.abs().sum(-1) / kept[t]
        return _Rows(values, present, torch.tensor(kept, dtype=torch.float32), scale)


def _pair_errors(rows: _Rows, check: Callable[[], None]) -> torch.Tensor:
    """``e[i, j]`` (``i < j``; 0 elsewhere): the drift from row ``i`` to row ``j``, the order-0 forecast error, for
    every pair at once (``pdist``: the L1 distance of every pair of rows, per tensor, in float64 as the drift always
    was measured)."""
    count_rows, tensors, _ = rows.values.shape
    first, second = torch.triu_indices(count_rows, count_rows, offset=1)  # pdist's order: row-major, i < j
    total = torch.zeros(len(first), dtype=torch.float64)
    count = torch.zeros(len(first), dtype=torch.float64)
    kept = rows.counts.double().clamp(min=1)
    for t in range(tensors):
        check()
        values = rows.values[:, t].double()
        distance = torch.nn.functional.pdist(values, p=1)  # sum |x_i - x_j|
        scale = values.abs().sum(-1) / kept[t] + _EPS
        relative = distance / kept[t] / scale[second]
        mask = rows.present[first, t] & rows.present[second, t]
        total += torch.where(mask, relative, 0.0)
        count += mask
    errors = torch.zeros(count_rows, count_rows, dtype=torch.float64)
    errors[first, second] = torch.where(count > 0, total / count.clamp(min=1), 0.0)
    return errors


def _forecast_errors(rows: _Rows, targets: torch.Tensor, sources: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``e[b]``: relative L1 between row ``targets[b]`` and ``sum_h weights[b, h] * row sources[b, h]``, averaged
    over the tensors present at all of them (0 where none is)."""
    residual = torch.index_select(rows.values, 0, targets)  # [B, T, E], a copy
    mask = rows.present[targets]
    weights = weights.float()
    for h in range(sources.shape[1]):
        read = torch.index_select(rows.values, 0, sources[:, h])
        residual.sub_(read.mul_(weights[:, h, None, None]))
        mask = mask & rows.present[sources[:, h]]
    relative = residual.abs_().sum(-1) / rows.counts.clamp(min=1) / rows.scale[targets]
    return (torch.where(mask, relative, 0.0).sum(1) / mask.sum(1).clamp(min=1)).double()


# ------------------------------------------------------------------------------------------------ the programme
@dataclass(frozen=True)
class ComputeSteps:
    """An optimal set of compute steps, its total (weighted) error, and how it was fitted (``FitLimits``)."""

    steps: tuple[int, ...]
    cost: float
    fit: str = "exact"

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


def _check_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    if weights is not None and (len(weights) != n or any(not math.isfinite(float(w)) or float(w) < 0 for w in weights)):
        raise ValueError(f"weights: need one finite weight >= 0 per step ({n}), got {list(weights)[:8]}...")
    return np.ones(n) if weights is None else np.array([float(w) for w in weights])


def _check_budget(budget: int, n: int, required: Iterable[int]) -> list[int]:
    must = sorted({0} | {int(s) for s in required if 0 <= int(s) < n})
    if not isinstance(budget, int) or isinstance(budget, bool) or not len(must) <= budget <= n:
        raise ValueError(
            f"budget: the number of compute steps must be an integer from {len(must)} (step 0 and the steps that "
            f"must compute) to {n} (every step), got {budget!r}"
        )
    return must


class _Programme:
    """The segment programme on positions ``0 .. size-1`` (``size``: the end of the run).

    A state is a compute position with the gaps back to its last ``order`` compute positions (fewer at the start of
    the run): all a forecast from it reads. The next compute position is at most ``gap`` later and never past a
    required one. ``evaluations`` lists the errors the states' segments need: state, offset, target position, and
    the positions its forecast reads (newest first, padded with the state's own) with their count - 1 (``depth``).
    """

    def __init__(self, size: int, gap: int, order: int, required: Iterable[int], check: Callable[[], None]):
        self.size, self.gap = size, gap
        must = {0, *required}
        next_must, upcoming = [size] * size, size
        for s in range(size - 1, -1, -1):
            next_must[s] = upcoming
            if s in must:
                upcoming = s
        index, positions, histories, follow = {(0, ()): 0}, [0], [()], []
        i = 0
        while i < len(positions):
            if i % 4096 == 0:
                check()
            s, history = positions[i], histories[i]
            row = [-1] * gap
            for g in range(1, min(gap, next_must[s] - s, size - 1 - s) + 1):
                key = (s + g, ((g, *history))[:order])
                j = index.get(key)
                if j is None:
                    j = index[key] = len(positions)
                    positions.append(s + g)
                    histories.append(key[1])
                row[g - 1] = j
            follow.append(row)
            i += 1
        self.positions = np.array(positions, dtype=np.int64)
        self.follow = np.array(follow, dtype=np.int64).reshape(len(positions), gap)
        self.depth = np.array([len(h) for h in histories], dtype=np.int64)
        reads = np.repeat(self.positions[:, None], order + 1, axis=1)
        for i, history in enumerate(histories):
            for d, g in enumerate(history):
                reads[i, d + 1] = reads[i, d] - g
        self.next_must = np.array(next_must, dtype=np.int64)
        self.longest = np.minimum(gap, self.next_must[self.positions] - self.positions)  # the end counts as a step
        per_state = self.longest - 1
        self.eval_state = np.repeat(np.arange(len(positions)), per_state)
        starts = np.cumsum(per_state) - per_state
        self.eval_offset = np.arange(len(self.eval_state)) - np.repeat(starts, per_state) + 1
        self.eval_target = self.positions[self.eval_state] + self.eval_offset
        self.eval_reads = reads[self.eval_state]
        self.eval_depth = self.depth[self.eval_state]

    def solve(self, errors: np.ndarray, weights: np.ndarray, budget: int, check: Callable[[], None]):
        """The ``budget`` compute positions of least ``sum(weights[j] * errors)`` and that sum."""
        count, gap = len(self.positions), self.gap
        contribution = np.zeros((count, gap))
        contribution[self.eval_state, self.eval_offset] = weights[self.eval_target] * errors
        segment = np.cumsum(contribution, axis=1)  # [state, g - 1]: the steps skipped before a gap of g
        segment[np.arange(gap)[None, :] >= self.longest[:, None]] = np.inf
        to_end = self.size - self.positions
        ends = (self.next_must[self.positions] == self.size) & (to_end <= gap)
        best = np.where(ends, segment[np.arange(count), np.minimum(to_end, gap) - 1], np.inf)
        valid = self.follow >= 0
        follow = np.where(valid, self.follow, 0)
        choice = np.zeros((budget + 1, count), dtype=np.int32)
        rows = np.arange(count)
        for m in range(2, budget + 1):
            check()
            candidate = segment + np.where(valid, best[follow], np.inf)
            pick = candidate.argmin(1)  # the first minimum: the earliest next compute step wins ties
            best = candidate[rows, pick]
            choice[m] = pick
        if not math.isfinite(best[0]):
            return None, math.inf
        steps, state = [0], 0
        for m in range(budget, 1, -1):
            state = self.follow[state, choice[m][state]]
            steps.append(int(self.positions[state]))
        return steps, float(best[0])


def optimal_compute_steps(
    drift: Sequence[Sequence[float]],
    budget: int,
    required: Iterable[int] = (),
    weights: Sequence[float] | None = None,
) -> ComputeSteps:
    """Exactly ``budget`` compute steps (step 0 and ``required`` among them) of least total drift, each step's drift
    times ``weights[step]`` where given (e.g. ``sigma_step_weights``); O(budget N²)."""
    n = _check_drift(drift)
    weight = _check_weights(weights, n)
    must = _check_budget(budget, n, required)
    programme = _Programme(n, n, 0, must, _no_check)
    matrix = np.array(drift, dtype=np.float64)
    errors = matrix[programme.eval_reads[:, 0], programme.eval_target]
    steps, cost = programme.solve(errors, weight, budget, _no_check)
    if steps is None:
        raise ValueError(f"budget: {budget} compute steps cannot include all required steps {must}")
    return ComputeSteps(tuple(steps), cost)


# ------------------------------------------------------------------------------------------------ forecast fits
@dataclass(frozen=True)
class FitLimits:
    """What one fit may spend (see the module docstring). The defaults keep a fit of 100 steps well under a second on
    one thread of a busy 2-core CPU, and runs up to ComfyUI's 10000 steps within about two (``docs/reuse-calibrate.md``,
    ``python -m reuse_core.calibration``)."""

    pair_work: float = 8e8  # order 0: values compared for every pair of steps (one L1 distance matrix per tensor)
    work: float = 1e8  # values compared for the forecast errors of the other plans
    min_elements: int = 2048  # least values one error is measured on, over all tensors (fewer: shorter gaps)
    cells: float = 4e7  # dynamic programme: budget x states x gaps
    states: float = 4e5  # states x gaps
    coarse_steps: int = 200  # most candidate positions of a coarse fit

    def __post_init__(self):
        for name in ("pair_work", "work", "min_elements", "cells", "states", "coarse_steps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
                raise ValueError(f"FitLimits.{name}: must be a finite number >= 1, got {value!r}")


@dataclass(frozen=True)
class _Plan:
    positions: tuple[int, ...]  # the candidate steps (every step, unless coarse)
    budget: int  # compute steps among them
    gap: int  # longest gap between compute steps, in candidates
    stride: int  # every stride-th recorded value is compared
    pairs: bool  # order 0 from the drift of every pair

    def describe(self, steps: int, budget: int, elements: int) -> str:
        values = f", {math.ceil(elements / self.stride)} of {elements} values per step" if self.stride > 1 else ""
        if len(self.positions) < steps:
            spread = "" if self.budget == budget else f", {self.budget} compute steps spread to {budget} by density"
            return f"coarse: {len(self.positions)} candidate steps, gaps <= {self.gap} candidates{spread}{values}"
        if self.gap >= steps:
            return "exact" if not values else f"every gap{values}"
        return f"gaps <= {self.gap}{values}"


def _counts(size: int, gap: int, order: int) -> tuple[int, int]:
    """States and error evaluations of a ``_Programme`` without required steps (an upper bound with them)."""
    s = np.arange(size)
    targets = np.minimum(gap, size - s) - 1
    choices = np.where(s == 0, 1, np.minimum(s, gap)).astype(np.float64)  # states of order 1 at s
    if order == 0:
        states = np.ones(size)
    elif order == 1:
        states = choices
    else:  # the compute position before s is a in [s - gap, s - 1]; each has choices[a] histories of its own
        prefix = np.concatenate([[0.0], np.cumsum(choices)])
        states = np.where(s == 0, 1.0, prefix[s] - prefix[np.maximum(0, s - gap)])
    return int(states.sum()), int((states * targets).sum())


def _gap_need(size: int, budget: int, must: Sequence[int]) -> int | None:
    """The shortest longest-gap with which ``budget`` compute positions cover ``size`` positions (None: none does)."""
    lengths = np.diff(np.array([*sorted(set(must)), size]))

    def needed(gap: int) -> int:
        return int(np.ceil(lengths / gap).sum())

    if needed(size) > budget:
        return None
    lo, hi = 1, size
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if needed(mid) <= budget else (mid + 1, hi)
    return lo


def _stride(elements: int, allowed: float, min_elements: int) -> int | None:
    """Compare every stride-th value to stay within ``allowed`` values per evaluation (None: below the minimum)."""
    stride = max(1, math.ceil(elements / max(allowed, 1.0)))
    return stride if math.ceil(elements / stride) >= min(elements, min_elements) else None


def _coarse_budget(steps: int, size: int, budget: int, required: int) -> int:
    """Compute steps among ``size`` candidates: all of them when they are few (at most a quarter), else the run's
    density of compute steps (at least a quarter of the candidates, to keep the profile's detail)."""
    return min(budget, size, max(round(budget * size / steps), min(budget, size // 4), required, 1))


def _plan(steps: int, budget: int, order: int, elements: int, must: Sequence[int], limits: FitLimits) -> _Plan:
    sizes, size = [steps], min(steps - 1, int(limits.coarse_steps))
    while size >= max(8, len(must) + 1):
        sizes.append(size)
        size = int(size * 0.8)
    fallback = None
    for size in sizes:
        positions = tuple(sorted({i * steps // size for i in range(size)} | set(must)))
        count = len(positions)
        at = {p: i for i, p in enumerate(positions)}
        must_at = [at[s] for s in must]
        k = budget if count == steps else _coarse_budget(steps, count, budget, len(must))
        need = _gap_need(count, k, must_at)
        if need is None:
            continue
        if order == 0 and count * count <= limits.states and k * count * count <= limits.cells:
            stride = _stride(elements, limits.pair_work / (count * count / 2), limits.min_elements)
            if stride is not None:
                return _Plan(positions, k, count, stride, True)

        def fits(gap: int, count=count, k=k) -> int | None:
            states, evaluations = _counts(count, gap, order)
            if k * states * gap > limits.cells or states * gap > limits.states:
                return None
            return _stride(elements, limits.work / max(1, evaluations), limits.min_elements)

        if fits(count) == 1:  # every gap on every value: the exact optimum
            return _Plan(positions, k, count, 1, False)
        # at order >= 1 a gap beyond three times the needed one is rarely worth what it costs (values, time)
        hi = count if order == 0 else min(count, max(3 * need, order + 2))
        lo = min(hi, max(need, math.ceil(1.5 * need)))
        if fits(lo) is not None:
            while lo < hi:  # the longest gap that fits
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if fits(mid) is not None else (lo, mid - 1)
            return _Plan(positions, k, lo, fits(lo), False)
        fallback = _Plan(positions, k, need, math.ceil(elements / min(elements, limits.min_elements)), False)
    return fallback


def _lagrange(times: np.ndarray, depth: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Row b: the weights of the polynomial through ``times[b, :depth[b] + 1]`` at ``at[b]`` (0 beyond the depth);
    ``reuse_core.forecast.newton_weights``, vectorised."""
    weights = np.zeros(times.shape)
    for d in range(times.shape[1]):
        rows = depth == d
        if not rows.any():
            continue
        t, x = times[rows, : d + 1], at[rows]
        for i in range(d + 1):
            w = np.ones(len(x))
            for j in range(d + 1):
                if j != i:
                    w *= (x - t[:, j]) / (t[:, i] - t[:, j])
            weights[rows, i] = w
    return weights


def _programme_errors(rows: _Rows, programme: _Programme, times: np.ndarray, check: Callable[[], None]) -> np.ndarray:
    """The forecast error of every evaluation the programme needs, in chunks of about 32 MB."""
    _, tensors, width = rows.values.shape
    count = len(programme.eval_target)
    chunk = max(1, 2**20 // max(1, tensors * width))  # about 4 MB per temporary: they stay in the cache
    errors = np.zeros(count)
    weights = _lagrange(times[programme.eval_reads], programme.eval_depth, times[programme.eval_target])
    for start in range(0, count, chunk):
        check()
        part = slice(start, start + chunk)
        errors[part] = _forecast_errors(
            rows,
            torch.from_numpy(programme.eval_target[part]),
            torch.from_numpy(programme.eval_reads[part]),
            torch.from_numpy(weights[part]),
        ).numpy()
    return errors


def _spread(steps: Sequence[int], total: int, budget: int) -> list[int]:
    """``budget`` compute steps of a ``total``-step run following the density of the coarse compute ``steps``: the
    n-th where the piecewise-linear count through (steps[i], i * budget / len(steps)) and (total, budget) reaches n."""
    knots_y = [i * budget / len(steps) for i in range(len(steps))] + [float(budget)]
    knots_x = [float(s) for s in steps] + [float(total)]
    out = [math.floor(float(np.interp(n, knots_y, knots_x)) + 0.5) for n in range(budget)]
    out[0] = 0
    for i in range(1, budget):
        out[i] = max(out[i], out[i - 1] + 1)
    out[-1] = min(out[-1], total - 1)
    for i in range(budget - 2, -1, -1):
        out[i] = min(out[i], out[i + 1] - 1)
    return out


def _with_required(steps: Iterable[int], must: Sequence[int]) -> list[int]:
    """``steps`` with each missing required step swapped in for the nearest step that is not required."""
    chosen = set(steps)
    for step in must:
        if step not in chosen:
            chosen.remove(min((s for s in chosen if s not in must), key=lambda s: (abs(s - step), s)))
            chosen.add(step)
    return sorted(chosen)


def forecast_cost(
    recorded: Trajectory,
    compute_steps: Iterable[int],
    order: int = 0,
    weights: Sequence[float] | None = None,
) -> float:
    """Sum over the skipped steps of the (weighted) error of a forecast of ``order`` from the ``compute_steps`` before
    each (the fit's objective, measured on every recorded value: for checking a schedule, not for long runs)."""
    n = recorded.steps
    weight = _check_weights(weights, n)
    keys = sorted(set(compute_steps))
    if not keys or keys[0] != 0 or keys[-1] >= n:
        raise ValueError(f"compute steps: need step 0 and steps below {n}, got {keys[:8]}")
    targets, reads, depth = [], [], []
    for j in range(n):
        before = [k for k in keys if k <= j][-(order + 1) :]
        if before[-1] != j:
            history = before[::-1]  # newest first, as the programme reads them
            targets.append(j)
            reads.append(history + [j] * (order + 1 - len(history)))
            depth.append(len(history) - 1)
    if not targets:
        return 0.0
    times = np.array(reads, dtype=np.float64)
    lagrange = _lagrange(times, np.array(depth), np.array(targets, dtype=np.float64))
    rows = recorded.rows(range(n))
    errors = _forecast_errors(rows, torch.tensor(targets), torch.tensor(reads), torch.from_numpy(lagrange)).numpy()
    return float((weight[np.array(targets)] * errors).sum())


def fit_compute_steps(
    recorded: Trajectory,
    budget: int,
    order: int = 0,
    required: Iterable[int] = (),
    weights: Sequence[float] | None = None,
    check: Callable[[], None] | None = None,
    limits: FitLimits | None = None,
) -> ComputeSteps:
    """Exactly ``budget`` compute steps (step 0 and ``required`` among them) of least total error of a forecast of
    ``order`` (0 reuse, 1 linear, 2 quadratic), each step's error times ``weights[step]`` where given.

    ``check()`` is called between chunks of work (whatever it raises ends the fit); ``limits`` bound the work (the
    module docstring says how); ``ComputeSteps.fit`` says which plan was used."""
    if order not in FORECASTS.values() or isinstance(order, bool):
        raise ValueError(f"forecast: the order must be one of {sorted(FORECASTS.values())}, got {order!r}")
    n = recorded.steps
    weight = _check_weights(weights, n)
    must = _check_budget(budget, n, required)
    check = check or _no_check
    limits = limits or FitLimits()
    plan = _plan(n, budget, order, max(1, recorded.elements), must, limits)
    positions = plan.positions
    at = {p: i for i, p in enumerate(positions)}
    bounds = [*positions, n]
    coarse_weight = np.array([weight[bounds[i] : bounds[i + 1]].sum() for i in range(len(positions))])
    programme = _Programme(len(positions), plan.gap, order, [at[s] for s in must], check)
    rows = recorded.rows(positions, plan.stride, check)
    if plan.pairs:
        errors = _pair_errors(rows, check).numpy()[programme.eval_reads[:, 0], programme.eval_target]
    else:
        errors = _programme_errors(rows, programme, np.array(positions, dtype=np.float64), check)
    if not np.isfinite(errors).all():
        raise ValueError("calibration: the recorded values are not all finite (the model's output held NaN or inf)")
    found, cost = programme.solve(errors, coarse_weight if len(positions) < n else weight, plan.budget, check)
    if found is None:
        raise ValueError(f"budget: {budget} compute steps cannot include all required steps {must}")
    steps = [positions[i] for i in found]
    if plan.budget < budget:
        steps = _with_required(_spread(steps, n, budget), must)
    return ComputeSteps(tuple(steps), cost, plan.describe(n, budget, recorded.elements))


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


def _forecast_name(order: int) -> str:
    return next(name for name, value in FORECASTS.items() if value == order)


@dataclass(frozen=True)
class CalibratedSchedules:
    """The two schedules of one calibration and what the recorded errors predict for them."""

    steps: int
    key_steps: tuple[int, ...]
    key_cost: float
    attention: ReuseSchedule
    attention_cost: float
    notes: tuple[str, ...] = field(default=())
    forecast: int = 0  # the order the key steps were fitted to (Encoder Feature Propagation's forecast)
    attention_forecast: int = 0  # the order the attention schedule was fitted to
    key_fit: str = "exact"  # how each was fitted (ComputeSteps.fit)
    attention_fit: str = "exact"

    @property
    def key_steps_text(self) -> str:
        return ",".join(str(s) for s in self.key_steps)

    @property
    def forecast_name(self) -> str:
        return _forecast_name(self.forecast)

    def report(self) -> str:
        def error(order: int) -> str:
            return "drift" if order == 0 else f"{_forecast_name(order)} forecast error"

        lines = [
            f"calibrated for {self.steps} steps",
            f"Encoder Feature Propagation custom_key_steps: {self.key_steps_text} "
            f"({len(self.key_steps)} key steps, {error(self.forecast)} {self.key_cost:.4g})",
            f"Attention Map Reuse custom_schedule: {self.attention} "
            f"({self.attention.reuse_count} reuse steps, {error(self.attention_forecast)} {self.attention_cost:.4g})",
        ]
        if self.forecast or self.attention_forecast:
            lines.append(
                f"forecast: Encoder Feature Propagation {self.forecast_name}, "
                f"Attention Map Reuse {_forecast_name(self.attention_forecast)}"
            )
        for what, fit in (("key steps", self.key_fit), ("schedule", self.attention_fit)):
            if fit != "exact":
                lines.append(f"{what} fitted with {fit}")
        return "\n".join([*lines, *self.notes])


def _fit(source, budget: int, order: int, required, weights, check, limits) -> ComputeSteps:
    if isinstance(source, Trajectory):
        return fit_compute_steps(source, budget, order, required, weights, check, limits)
    if order:
        raise ValueError("calibration: a drift matrix holds the errors of reuse only; forecasts need the recordings")
    return optimal_compute_steps(source, budget, required, weights)


def calibrate(
    encoder_drift: Sequence[Sequence[float]] | Trajectory,
    attention_drift: Sequence[Sequence[float]] | Trajectory,
    budget: Budget,
    encoder_reuse_cost: float,
    attention_reuse_cost: float,
    required: Iterable[int] = (),
    weights: Sequence[float] | None = None,
    forecast: int = 0,
    attention_forecast: int | None = None,
    check: Callable[[], None] | None = None,
    limits: FitLimits | None = None,
) -> CalibratedSchedules:
    """Both schedules for ``budget`` from one full run: drift matrices (reuse only, the exact programme) or the
    recordings (``ChangeRecorder.trajectory``), fitted to a forecast of order ``forecast`` (the attention schedule to
    ``attention_forecast``, default the same)."""

    def steps_of(source) -> int:
        return source.steps if isinstance(source, Trajectory) else len(source)

    steps = steps_of(encoder_drift)
    if steps_of(attention_drift) != steps:
        raise ValueError(f"attention drift: {steps_of(attention_drift)} steps, encoder drift {steps}; record one run")
    attention_forecast = forecast if attention_forecast is None else attention_forecast
    required = tuple(required)
    key_budget = budget.compute_steps(steps, encoder_reuse_cost)
    attention_budget = budget.compute_steps(steps, attention_reuse_cost)
    keys = _fit(encoder_drift, key_budget, forecast, required, weights, check, limits)
    computes = _fit(attention_drift, attention_budget, attention_forecast, required, weights, check, limits)
    return CalibratedSchedules(
        steps,
        keys.steps,
        keys.cost,
        computes.schedule(steps),
        computes.cost,
        forecast=forecast,
        attention_forecast=attention_forecast,
        key_fit=keys.fit,
        attention_fit=computes.fit,
    )


def _time_fits(argv: Sequence[str] | None = None) -> None:
    """``python -m reuse_core.calibration``: time ``fit_compute_steps`` alone on synthetic recordings (a smooth
    trajectory per tensor plus noise) for each step count, tensor count and order; prints a Markdown table."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=_time_fits.__doc__)
    parser.add_argument("--steps", default="100,800,10000", help="step counts, comma separated")
    parser.add_argument("--tensors", default="16,64", help="recorded tensors, comma separated")
    parser.add_argument("--values", type=int, default=DEFAULT_MAX_ELEMENTS, help="values per tensor and step")
    parser.add_argument("--max-gb", type=float, default=6.0, help="skip recordings larger than this")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.values} values per tensor and step")
    print("| steps | tensors | order | compute steps | fit (s) | plan |\n|---|---|---|---|---|---|")
    for steps in (int(s) for s in args.steps.split(",")):
        for tensors in (int(t) for t in args.tensors.split(",")):
            if steps * tensors * args.values * 4 > args.max_gb * 2**30:
                print(f"| {steps} | {tensors} | - | - | - | skipped: recording over {args.max_gb:g} GB |")
                continue
            gen = torch.Generator().manual_seed(0)
            base, velocity, curve = (torch.randn(tensors, args.values, generator=gen) for _ in range(3))
            noise = 0.01 * torch.randn(64, tensors, args.values, generator=gen)
            per_step = []
            for s in range(steps):
                t = s / steps
                values = base + velocity * math.sqrt(t) + curve * t * t + noise[s % 64].roll(s // 64, -1)
                per_step.append({("tensor", i): values[i] for i in range(tensors)})
            recorder = ChangeRecorder(args.values)
            recorder._samples = dict(enumerate(per_step))  # what record() keeps, without its copies
            weights = sigma_step_weights([14.6 * (1 - i / steps) ** 3 for i in range(steps + 1)])
            for order in sorted(FORECASTS.values()):
                for budget in (steps // 2, steps // 5):
                    start = time.perf_counter()  # what the node does after sampling, for one of its two schedules
                    found = fit_compute_steps(recorder.trajectory(steps), budget, order, weights=weights)
                    took = time.perf_counter() - start
                    print(f"| {steps} | {tensors} | {order} | {budget} | {took:.2f} | {found.fit} |", flush=True)
            del per_step, recorder


if __name__ == "__main__":
    _time_fits()
