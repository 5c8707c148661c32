"""Range estimators that accumulate statistics over calibration batches.

Every observer sees tensors through `observe(x)` and answers `compute_range() -> (xmin, xmax)`:
0-dim tensors per tensor (`ch_axis=None`), or `(C,)` per channel (reducing over all other axes).
Observers are plain Python objects holding tensors (picklable and deep-copyable); they are not
`nn.Module`s, so calibration statistics never enter a model's `state_dict`.

Subsampling (percentile on huge tensors, the MSE observer's value sample) is deterministic: indices
come from a local `torch.Generator` seeded by the observer's seed and batch count, never from the
global RNG. Random (not strided) indices avoid aliasing with channel-last layouts.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from carsam.quant.primitives import integer_range, qparams_from_range, validate_bits

logger = logging.getLogger(__name__)

QUANTILE_MAX_ELEMENTS = 2**24  # torch.quantile refuses larger inputs


def to_rows(x: Tensor, ch_axis: int | None) -> Tensor:
    """View `x` as `(C, N)` float32 rows: one row per channel along `ch_axis`, or one row if None."""
    x = x.detach().float()
    if ch_axis is None:
        return x.reshape(1, -1)
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


def sample_columns(rows: Tensor, k: int, seed: int) -> Tensor:
    """Deterministically pick `k` columns (with replacement) of `rows` `(C, N)` if `N > k`: `(C, min(N, k))`."""
    n = rows.shape[1]
    if n <= k:
        return rows
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (k,), generator=gen).to(rows.device)
    return rows.index_select(1, idx)


def from_rows(values: Tensor, ch_axis: int | None) -> Tensor:
    """Per-row statistics `(C,)` back to the range's shape: `()` per tensor, `(C,)` per channel."""
    return values.reshape(()) if ch_axis is None else values


class Observer:
    """Base class: counts batches and checks that a range is asked for only after data was seen."""

    def __init__(self, ch_axis: int | None = None, seed: int = 0) -> None:
        self.ch_axis = ch_axis
        self.seed = seed
        self.num_batches = 0

    @property
    def has_data(self) -> bool:
        """Whether `observe` was called since construction or the last `reset`."""
        return self.num_batches > 0

    def observe(self, x: Tensor) -> None:
        """Accumulate statistics of one batch `x` (any shape; `ch_axis` must be a valid axis)."""
        with torch.no_grad():
            self._observe_rows(to_rows(x, self.ch_axis))
        self.num_batches += 1

    def compute_range(self) -> tuple[Tensor, Tensor]:
        """The estimated range `(xmin, xmax)`, shapes `()` or `(C,)`."""
        if not self.has_data:
            raise RuntimeError(f"{type(self).__name__}.compute_range() called before any observe()")
        with torch.no_grad():
            xmin, xmax = self._range_rows()
        return from_rows(xmin, self.ch_axis), from_rows(xmax, self.ch_axis)

    def reset(self) -> None:
        """Forget all statistics."""
        self.num_batches = 0
        self._reset_stats()

    def _observe_rows(self, rows: Tensor) -> None:
        raise NotImplementedError

    def _range_rows(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _reset_stats(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ch_axis={self.ch_axis}, batches={self.num_batches})"


class MinMaxObserver(Observer):
    """Running minimum and maximum over all batches."""

    def __init__(self, ch_axis: int | None = None, seed: int = 0) -> None:
        super().__init__(ch_axis, seed)
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None

    def _observe_rows(self, rows: Tensor) -> None:
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    def _range_rows(self) -> tuple[Tensor, Tensor]:
        assert self.min_val is not None and self.max_val is not None
        return self.min_val, self.max_val


class PercentileObserver(Observer):
    """Per batch the `(100 - p)`-th and `p`-th percentiles (linear interpolation, like
    `torch.quantile`), averaged over batches. Batches over 2^24 elements are subsampled."""

    def __init__(self, percentile: float = 99.99, ch_axis: int | None = None, seed: int = 0) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(ch_axis, seed)
        self.percentile = percentile
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.sum_low: Tensor | None = None
        self.sum_high: Tensor | None = None

    def _observe_rows(self, rows: Tensor) -> None:
        k = max(1, QUANTILE_MAX_ELEMENTS // rows.shape[0])
        rows = sample_columns(rows, k, self.seed + self.num_batches)
        p = self.percentile / 100.0
        levels = torch.tensor([1.0 - p, p], device=rows.device)
        low, high = torch.quantile(rows, levels, dim=1)
        self.sum_low = low if self.sum_low is None else self.sum_low + low
        self.sum_high = high if self.sum_high is None else self.sum_high + high

    def _range_rows(self) -> tuple[Tensor, Tensor]:
        assert self.sum_low is not None and self.sum_high is not None
        return self.sum_low / self.num_batches, self.sum_high / self.num_batches


class MSEObserver(Observer):
    """Range search minimising the mean `|x - fq(x)|^p` over shrunk min/max ranges.

    Candidates are `(alpha * min, alpha * max)` for `alpha` in `linspace(0.01, 1, grid)` (QDrop/BRECQ
    style), searched independently per row (channel), vectorised over channels. Statistics: running
    min/max over all batches plus a bounded value sample (at most `max_samples` columns per row),
    merged across batches in proportion to the number of values each part stands for. The min/max
    range (`alpha = 1`) wins ties, so the chosen error is never above min/max's on the sample.
    """

    uses_qspec = True  # the quantizer passes its bits/symmetric/symmetric_scale to the constructor

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        ch_axis: int | None = None,
        p: float = 2.0,
        grid: int = 100,
        max_samples: int = 2**20,
        seed: int = 0,
        symmetric_scale: str = "qmax",
    ) -> None:
        super().__init__(ch_axis, seed)
        if grid < 1 or max_samples < 1 or p <= 0:
            raise ValueError(f"need grid >= 1, max_samples >= 1, p > 0; got {grid}, {max_samples}, {p}")
        self.bits, self.symmetric, self.symmetric_scale = validate_bits(bits), symmetric, symmetric_scale
        self.p, self.grid, self.max_samples = p, grid, max_samples
        self._minmax = MinMaxObserver()
        self._reset_stats()

    def _reset_stats(self) -> None:
        self._minmax.reset()
        self.sample: Tensor | None = None
        self.seen = 0  # values per row represented by the sample

    def _observe_rows(self, rows: Tensor) -> None:
        self._minmax._observe_rows(rows)
        seed = self.seed + self.num_batches
        n_new = rows.shape[1]
        if self.sample is None:  # clone: `rows` may be a view of a weight that is edited later
            self.sample = sample_columns(rows, self.max_samples, seed).clone()
        else:
            k_old = round(self.max_samples * self.seen / (self.seen + n_new))
            old = sample_columns(self.sample, k_old, seed)
            new = sample_columns(rows, max(1, self.max_samples - old.shape[1]), seed + 7919)
            self.sample = torch.cat([old, new], dim=1)
        self.seen += n_new

    def _range_rows(self) -> tuple[Tensor, Tensor]:
        assert self.sample is not None
        lo, hi = self._minmax._range_rows()
        best_lo, best_hi = lo.clone(), hi.clone()
        best_err = self.error(self.sample, lo, hi)
        for alpha in torch.linspace(0.01, 1.0, self.grid).flip(0)[1:].tolist():
            err = self.error(self.sample, alpha * lo, alpha * hi)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, alpha * lo, best_lo)
            best_hi = torch.where(better, alpha * hi, best_hi)
        return best_lo, best_hi

    def error(self, rows: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Mean `|x - fq(x)|^p` per row of `rows` `(C, N)` for ranges `lo`, `hi` `(C,)`: `(C,)`.

        Same arithmetic as `fake_quantize`, written with in-place ops (no autograd, few allocations).
        """
        scale, zero_point = qparams_from_range(lo, hi, self.bits, self.symmetric, symmetric_scale=self.symmetric_scale)
        qmin, qmax = integer_range(self.bits, self.symmetric)
        s, z = scale[:, None], zero_point[:, None]
        err = rows * s.reciprocal()
        err.round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s).sub_(rows).abs_()
        err = err.square_() if self.p == 2.0 else err.pow_(self.p)
        return err.mean(dim=1)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def build_observer(name: str, **kwargs: Any) -> Observer:
    """Build the observer registered as `name` ('minmax' | 'percentile' | 'mse') with `kwargs`."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer '{name}'; valid names: {sorted(OBSERVERS)}")
    return OBSERVERS[name](**kwargs)
