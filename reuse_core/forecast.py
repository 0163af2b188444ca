"""Forecasting what a reuse step skips, from the last few computed values (TaylorSeer / FoCa style, order 0-2).

Both methods compute a quantity at some steps and skip it at others: Encoder Feature Propagation the encoder's
features (computed at key steps), Attention Map Reuse each layer's attention output (computed where the schedule
bit is 1). Plain reuse (order 0, the papers) hands a skipped step the last computed value unchanged, so its error
grows with the trajectory's slope. A forecast of order ``k`` keeps the last ``k + 1`` computed values of each cache
entry and evaluates the polynomial through them at the skipped step: the Newton interpolating polynomial
(order 1: ``v1 + (t - t1) (v1 - v0) / (t1 - t0)``, order 2 adds the second divided difference times
``(t - t1)(t - t2)``), evaluated as one weighted sum of the kept values (its Lagrange form: the same polynomial,
with no difference tensors kept beside the values). Its error grows with the curvature instead.

Time variable: the sampling step index. On the built-in models' schedules (DDIM's evenly spaced timesteps, the DiT's
linear flow sigmas) index and timestep are affine to each other, so their forecasts are the same polynomial (measured:
identical PSNR, ``docs/forecasting.md``); on schedules that bunch their steps (Karras, shifted flow sigmas), the index
measured 1.4-4.5 dB better than the timestep on a trained Flux-architecture model in ComfyUI: a sampler's steps are
evenly spaced in index, not in timestep, and the features change about evenly per step.

Until an entry has ``k + 1`` values (the first computed steps of a run, a schedule with too few compute steps
before a skipped step, a refused store), the forecast uses the order its history supports, down to plain reuse:
``Forecast.order_used`` says which, so engines can count and log it. Order 0 returns the kept value itself, so
``reuse`` is bit for bit the engines' behaviour without forecasting.

Host-agnostic: never imports ComfyUI or diffusers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

# Node input value -> order. ``reuse`` is the papers' zeroth order.
FORECASTS = {"reuse": 0, "linear": 1, "quadratic": 2}

T = TypeVar("T")


@dataclass(frozen=True)
class ForecastSpec:
    """Validated forecast setting: the polynomial order (0 = reuse)."""

    order: int = 0

    def __post_init__(self):
        if self.order not in FORECASTS.values() or isinstance(self.order, bool):
            names = ", ".join(f"{name} ({order})" for name, order in FORECASTS.items())
            raise ValueError(f"forecast: must be one of {names}, got {self.order!r}")

    @classmethod
    def from_input(cls, name: str) -> ForecastSpec:
        if name not in FORECASTS:
            raise ValueError(f"forecast: must be one of {', '.join(FORECASTS)}, got {name!r}")
        return cls(FORECASTS[name])

    @property
    def name(self) -> str:
        return next(name for name, order in FORECASTS.items() if order == self.order)

    @property
    def history(self) -> int:
        """How many computed values an entry keeps."""
        return self.order + 1


def newton_weights(times: Sequence[float], t: float) -> list[float]:
    """Weights ``w`` with ``p(t) = sum(w[i] * v[i])`` for the polynomial through ``(times[i], v[i])``."""
    weights = []
    for i, ti in enumerate(times):
        w = 1.0
        for j, tj in enumerate(times):
            if j != i:
                w *= (t - tj) / (ti - tj)
        weights.append(w)
    return weights


def weighted_sum(weights: Sequence[float], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum(w * v)``, accumulated in fp32 at least (bf16/fp16 features keep their dtype on the way out). Integer
    and boolean tensors (indices, masks) are not trajectories: the last value is kept."""
    if not values[-1].is_floating_point():
        return values[-1]
    acc_dtype = torch.promote_types(values[0].dtype, torch.float32)
    out = values[-1].to(acc_dtype) * weights[-1]
    for w, v in zip(weights[:-1], values[:-1], strict=True):
        out = out.add(v.to(acc_dtype), alpha=w)
    return out.to(values[-1].dtype)


class Forecast(Generic[T]):
    """The last ``order + 1`` computed values of one cache entry, and their polynomial's value at a later time.

    ``combine(weights, values)`` makes the weighted sum of several values (``weighted_sum`` for tensors; a
    structure of tensors such as ``EncoderFeatures`` maps it over its members).
    """

    def __init__(self, order: int, combine: Callable[[Sequence[float], Sequence[T]], T] = weighted_sum):
        self.order = order
        self.combine = combine
        self._times: list[float] = []
        self._values: list[T] = []

    def __len__(self) -> int:
        return len(self._values)

    @property
    def values(self) -> tuple[T, ...]:
        return tuple(self._values)

    def push(self, time: float, value: T) -> None:
        """A value computed at ``time``: the same time again replaces its value (the last call wins, as in the
        engines' caches), an earlier time restarts the history (a new trajectory)."""
        if self._times and time <= self._times[-1]:
            if time == self._times[-1]:
                del self._times[-1], self._values[-1]
            else:
                self.clear()
        self._times.append(float(time))
        self._values.append(value)
        if len(self._values) > self.order + 1:
            del self._times[0], self._values[0]

    def clear(self) -> None:
        self._times.clear()
        self._values.clear()

    def order_used(self) -> int:
        """The order the next ``at`` uses: ``order``, or lower while fewer values are kept (-1: none kept)."""
        return min(self.order, len(self._values) - 1)

    def at(self, time: float) -> T:
        """The forecast at ``time`` (the last value itself at order 0)."""
        used = self.order_used()
        if used < 0:
            raise LookupError("forecast: nothing computed yet")
        return extrapolate(self._times[-used - 1 :], self._values[-used - 1 :], time, self.combine)


def extrapolate(times: Sequence[float], values: Sequence[T], time: float, combine=weighted_sum) -> T:
    """The polynomial through ``(times[i], values[i])`` at ``time``; one value is returned itself (order 0)."""
    if len(values) == 1:
        return values[0]
    return combine(newton_weights(times, float(time)), values)
