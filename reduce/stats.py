"""Streaming per-unit statistics: count, mean, variance, min, max, histogram and peak (mode).

Everything is vectorised over units and accumulated in float64: moments merge with Chan's
formula, so batches (or whole runs on other machines) combine in any grouping.

Histograms live on a dyadic lattice, which makes them exact under growth and merging. A unit's
bins have width ``2**level`` and edges at integer multiples of it; its window is ``bins``
consecutive lattice cells starting at cell ``start``. When new values fall outside the window,
the level rises just enough for the unit's whole range to fit and old counts move to their
parent cells (a cell at one level lies inside exactly one cell of every coarser level), so no
count is ever split or guessed, and a first batch that covers only part of the range costs
resolution only as far as the full range needs. Two histograms merge the same way, at the
coarser of their levels. The window always holds at least ``bins / 2 - 1`` cells of data, so the
resolution is within a factor two of a histogram fitted to the final range.

The peak is the modal activation, the baseline of seed paper 004's "peak ablation". ``naive``
is their estimate: the centre of the fullest bin. ``refined`` works on densities: the two end
bins of the data count over the part the exact minimum / maximum leaves them, a five-tap binomial
kernel smooths the counts (renormalised at the edges of the data, so one noisy bin cannot win and
a pile-up against an edge is not smeared inwards), and the mode is the vertex of the parabola
through the log densities of the densest bin and its two neighbours: exact for a locally Gaussian
peak and well below a bin width in general. When the density is highest at an edge of the data
(GELU's minimum, ReLU's zero, an exponential) the mode is that edge, the exact min or max.
Broad, skewed peaks remain limited by sampling noise, as any mode estimate is.
"""

from __future__ import annotations

import numpy as np
import torch

# Levels never go finer than 2**-LEVEL_SPAN times a unit's largest magnitude, so a constant
# unit (zero range) still gets a finite bin and cell indices stay far inside int64.
LEVEL_SPAN = 45
_SMOOTHING = (1.0, 4.0, 6.0, 4.0, 1.0)


class RunningStats:
    """Streaming statistics of ``n_units`` units, updated with ``(n, n_units)`` batches of values.

    Attributes after any updates: ``count`` (per unit), ``mean``, ``var`` (population variance),
    ``std``, ``min``, ``max``, ``histogram`` ``(n_units, bins)`` with ``edges`` ``(n_units, bins + 1)``,
    and :meth:`peak`. :meth:`merge` combines two; :meth:`concat` stacks unit sets;
    :meth:`to_dataset` / :meth:`from_dataset` save and restore them exactly.
    """

    def __init__(self, n_units: int, bins: int = 256, *, device="cpu"):
        if bins < 4 or bins % 2:
            raise ValueError(f"bins must be an even number >= 4, got {bins}")
        self.bins = bins
        self.device = torch.device(device)
        zeros = lambda dtype: torch.zeros(n_units, dtype=dtype, device=self.device)  # noqa: E731
        self.count = zeros(torch.int64)
        self._mean = zeros(torch.float64)
        self._m2 = zeros(torch.float64)
        self._min = torch.full((n_units,), torch.inf, dtype=torch.float64, device=self.device)
        self._max = torch.full((n_units,), -torch.inf, dtype=torch.float64, device=self.device)
        self.histogram = torch.zeros(n_units, bins, dtype=torch.int64, device=self.device)
        self.level = zeros(torch.int64)
        self.start = zeros(torch.int64)
        self._buffers = None

    @property
    def n_units(self) -> int:
        return int(self.count.shape[0])

    # -- accumulation ---------------------------------------------------------------------

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> "RunningStats":
        """Add ``values`` of shape ``(n, n_units)`` (one row per token; no padding rows)."""
        values = torch.as_tensor(values).to(self.device)
        if values.ndim != 2 or values.shape[1] != self.n_units:
            raise ValueError(f"expected values of shape (n, {self.n_units}), got {tuple(values.shape)}")
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()  # exact; half precision would overflow when scaled to cells
        n = values.shape[0]
        if n == 0:
            return self
        # amin / amax: torch.aminmax along dim 0 is about ten times slower on CPU.
        low, high = values.amin(0).double(), values.amax(0).double()
        self._fit_window(torch.minimum(self._min, low), torch.maximum(self._max, high), arriving=torch.ones_like(self.count, dtype=torch.bool))
        # Every step writes into buffers kept between batches: fresh multi-megabyte temporaries
        # cost more in page faults than the arithmetic itself (about 3x on this CPU).
        scaled, cells, ones = self._scratch(n)
        # Scaling by a power of two is exact, so the cells agree with float64 edges bit for bit;
        # in float64 the scale stays finite even for float32 values near the smallest normal.
        torch.mul(values, torch.exp2(-self.level.double()), out=scaled)
        cells.copy_(scaled.floor_())
        cells += torch.arange(self.n_units, device=self.device) * self.bins - self.start
        self.histogram.view(-1).scatter_add_(0, cells.view(-1), ones)
        # Two passes in float64 (sum, then squared deviations) are exact enough and several
        # times faster than torch.var_mean's per-element Welford update.
        as_double = scaled.copy_(values)
        mean = as_double.sum(0) / n
        m2 = as_double.sub_(mean).square_().sum(0)
        self._add_moments(torch.full_like(self.count, n), mean, m2, low, high)
        return self

    def _scratch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, n_units) float64 and int64 work buffers and a run of int64 ones, grown as needed
        (a real tensor of ones: scatter_add_ is slow on an expanded one)."""
        if self._buffers is None or self._buffers[0].shape[0] < rows or self._buffers[0].shape[1] != self.n_units:
            self._buffers = (
                torch.empty(rows, self.n_units, dtype=torch.float64, device=self.device),
                torch.empty(rows, self.n_units, dtype=torch.int64, device=self.device),
                torch.ones(rows * self.n_units, dtype=torch.int64, device=self.device),
            )
        scaled, cells, ones = self._buffers
        return scaled[:rows], cells[:rows], ones[: rows * self.n_units]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_buffers": None}  # work buffers are not sent to another process

    @torch.no_grad()
    def merge(self, other: "RunningStats") -> "RunningStats":
        """Add another accumulator of the same units (e.g. from another process) into this one."""
        if other.n_units != self.n_units or other.bins != self.bins:
            raise ValueError("can only merge statistics of the same units and bin count")
        count, mean, m2, low, high, histogram, level, start = (
            getattr(other, name).to(self.device) for name in ("count", "_mean", "_m2", "_min", "_max", "histogram", "level", "start")
        )
        arriving = count > 0
        self._fit_window(torch.minimum(self._min, low), torch.maximum(self._max, high), arriving=arriving, at_least=torch.where(arriving, level, self.level))
        self.histogram += _rebin(histogram, level, start, self.level, self.start, self.bins)
        self._add_moments(count, mean, m2, low, high)
        return self

    @classmethod
    def concat(cls, parts: list["RunningStats"]) -> "RunningStats":
        """One accumulator over the units of ``parts`` in order (e.g. one per site)."""
        bins = {p.bins for p in parts}
        if len(bins) != 1:
            raise ValueError("can only concatenate statistics with the same bin count")
        out = cls(0, bins.pop(), device=parts[0].device)
        for name in ("count", "_mean", "_m2", "_min", "_max", "histogram", "level", "start"):
            setattr(out, name, torch.cat([getattr(p, name).to(out.device) for p in parts]))
        return out

    def _add_moments(self, count, mean, m2, minimum, maximum) -> None:
        total = self.count + count
        weight = count.double() / total.clamp(min=1).double()
        delta = mean - self._mean
        self._mean = self._mean + delta * weight
        self._m2 = self._m2 + m2 + delta**2 * self.count * weight
        self.count = total
        self._min = torch.minimum(self._min, minimum)
        self._max = torch.maximum(self._max, maximum)

    def _fit_window(self, low, high, *, arriving, at_least=None) -> None:
        """Before data ``arriving`` per unit: move each window (and its counts) so [low, high] fits,
        coarsening the bins (never refining them) as far as needed."""
        had_data = self.count > 0
        level = torch.maximum(_level_for(low, high, self.bins), torch.where(had_data, self.level, _level_floor(low, high)))
        if at_least is not None:
            level = torch.maximum(level, at_least)
        first, last = _cell(low, level), _cell(high, level)
        inside = (first >= self.start) & (last < self.start + self.bins) & (level == self.level)
        moving = (had_data | arriving) & ~inside
        if not moving.any():
            return
        # Centre the data so later batches have room to grow either way before rebinning.
        start = first - (self.bins - (last - first + 1)) // 2
        rows = moving.nonzero()[:, 0]
        # Units without counts have empty histograms: only their windows move (on a first batch, all of them).
        filled = (moving & had_data).nonzero()[:, 0]
        if len(filled):
            self.histogram[filled] = _rebin(self.histogram[filled], self.level[filled], self.start[filled], level[filled], start[filled], self.bins)
        self.level[rows] = level[rows]
        self.start[rows] = start[rows]

    # -- results ----------------------------------------------------------------------------

    @property
    def mean(self) -> torch.Tensor:
        return torch.where(self.count > 0, self._mean, torch.nan)

    @property
    def var(self) -> torch.Tensor:
        """Population variance (``ddof=0``)."""
        return torch.where(self.count > 0, self._m2 / self.count.clamp(min=1), torch.nan)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @property
    def min(self) -> torch.Tensor:
        return torch.where(self.count > 0, self._min, torch.nan)

    @property
    def max(self) -> torch.Tensor:
        return torch.where(self.count > 0, self._max, torch.nan)

    @property
    def bin_width(self) -> torch.Tensor:
        return torch.exp2(self.level.double())

    @property
    def edges(self) -> torch.Tensor:
        """``(n_units, bins + 1)`` bin edges; exact (multiples of a power of two)."""
        cells = self.start[:, None] + torch.arange(self.bins + 1, device=self.device)
        return cells.double() * self.bin_width[:, None]

    def peak(self, method: str = "refined") -> torch.Tensor:
        """The modal value per unit (``"naive"``: fullest bin's centre; ``"refined"``: see module doc)."""
        counts = self.histogram.double()
        if method == "naive":
            offset = counts.argmax(1).double() + 0.5
        elif method == "refined":
            offset = _refined_mode(counts, self._min / self.bin_width - self.start, self._max / self.bin_width - self.start)
        else:
            raise ValueError(f"method must be 'naive' or 'refined', got {method!r}")
        return torch.where(self.count > 0, (self.start.double() + offset) * self.bin_width, torch.nan)

    # -- saving -----------------------------------------------------------------------------

    def to_dataset(self, units: dict | None = None):
        """An xarray Dataset over dimension ``unit`` (and ``bin``); ``units``: coordinates over units,
        e.g. the unit table's ``{"site": ("unit", ...), "layer": ..., "kind": ..., "index": ...}``."""
        import xarray as xr

        as_numpy = lambda t: t.cpu().numpy()  # noqa: E731
        variables = {name: ("unit", as_numpy(getattr(self, name))) for name in ("count", "mean", "var", "min", "max")}
        variables["peak"] = ("unit", as_numpy(self.peak("refined")))
        variables["peak_naive"] = ("unit", as_numpy(self.peak("naive")))
        variables["histogram"] = (("unit", "bin"), as_numpy(self.histogram))
        variables["bin_lo"] = ("unit", as_numpy(self.start.double() * self.bin_width))
        variables["bin_width"] = ("unit", as_numpy(self.bin_width))
        dataset = xr.Dataset(variables, coords=units or {})
        dataset["var"].attrs["description"] = "population variance (ddof=0)"
        dataset["peak"].attrs["description"] = "modal value: Gaussian interpolation on the smoothed histogram's fullest bin"
        dataset["peak_naive"].attrs["description"] = "modal value: centre of the fullest histogram bin"
        dataset["histogram"].attrs["description"] = "counts; bin k spans bin_lo + bin_width * [k, k + 1)"
        dataset.attrs["bins"] = self.bins
        return dataset

    @classmethod
    def from_dataset(cls, dataset, *, device="cpu") -> "RunningStats":
        """Restore an accumulator saved with :meth:`to_dataset` (it can keep accumulating)."""
        bins = int(dataset.sizes["bin"])
        out = cls(int(dataset.sizes["unit"]), bins, device=device)
        tensor = lambda name, dtype: torch.as_tensor(np.asarray(dataset[name].values), dtype=dtype, device=out.device)  # noqa: E731
        out.count = tensor("count", torch.int64)
        seen = out.count > 0
        out._mean = torch.where(seen, tensor("mean", torch.float64), 0.0)
        out._m2 = torch.where(seen, tensor("var", torch.float64) * out.count, 0.0)
        out._min = torch.where(seen, tensor("min", torch.float64), torch.inf)
        out._max = torch.where(seen, tensor("max", torch.float64), -torch.inf)
        out.histogram = tensor("histogram", torch.int64)
        width = tensor("bin_width", torch.float64)
        out.level = torch.log2(width).round().long()
        out.start = torch.round(tensor("bin_lo", torch.float64) / width).long()
        return out

    def save(self, path, units: dict | None = None) -> None:
        from .store import write_netcdf

        write_netcdf(self.to_dataset(units), path)

    @classmethod
    def load(cls, path, *, device="cpu") -> "RunningStats":
        import xarray as xr

        return cls.from_dataset(xr.load_dataset(path, engine="h5netcdf"), device=device)


def _cell(values: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    return torch.floor(values * torch.exp2(-level.double())).long()


def _level_floor(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    magnitude = torch.maximum(low.abs(), high.abs())
    magnitude = torch.where(torch.isfinite(magnitude), magnitude, torch.zeros_like(magnitude))
    return torch.frexp(magnitude).exponent.long() - LEVEL_SPAN


def _level_for(low: torch.Tensor, high: torch.Tensor, bins: int) -> torch.Tensor:
    """The finest level at which [low, high] covers at most ``bins`` cells (never below the floor)."""
    floor = _level_floor(low, high)
    span = torch.where(high >= low, high - low, torch.zeros_like(high))
    # At width w, [low, high] touches at most span / w + 2 cells, so this level always fits...
    safe = torch.ceil(torch.log2(span / (bins - 2))).nan_to_num(neginf=-1e4).long().maximum(floor)
    # ...and often the one below does too.
    finer = (safe - 1).maximum(floor)
    fits = _cell(high, finer) - _cell(low, finer) + 1 <= bins
    return torch.where(fits, finer, safe)


def _rebin(histogram, level, start, new_level, new_start, bins: int) -> torch.Tensor:
    """Counts of cells (level, start + i) moved to the coarser cells (new_level, new_start + j)."""
    cells = start[:, None] + torch.arange(bins, device=histogram.device)
    shift = (new_level - level).clamp(0, 62)[:, None]
    target = (torch.bitwise_right_shift(cells, shift) - new_start[:, None]).clamp(0, bins - 1)
    return torch.zeros_like(histogram).scatter_add_(1, target, histogram)


def _smooth(rows: torch.Tensor) -> torch.Tensor:
    """Each row convolved with the binomial kernel, zero outside (shifted sums: conv1d is slow
    for many short rows)."""
    half = len(_SMOOTHING) // 2
    padded = torch.nn.functional.pad(rows, (half, half))
    width = rows.shape[1]
    smoothed = padded[:, :width] * _SMOOTHING[0]
    for i, weight in enumerate(_SMOOTHING[1:], 1):
        smoothed.add_(padded[:, i : i + width], alpha=weight)  # in place: no temporary per tap
    return smoothed.div_(sum(_SMOOTHING))


def _refined_mode(counts: torch.Tensor, first_value: torch.Tensor, last_value: torch.Tensor) -> torch.Tensor:
    """Fractional bin offset of the mode (0 = left edge of bin 0) per row of ``counts``.

    ``first_value`` / ``last_value``: the exact minimum and maximum, as bin offsets.
    """
    bins = counts.shape[1]
    position = torch.arange(bins, device=counts.device)
    occupied = counts > 0
    first = torch.where(occupied, position, bins).amin(1)
    last = torch.where(occupied, position, -1).amax(1)
    support = ((position >= first[:, None]) & (position <= last[:, None])).to(counts.dtype)
    # The end bins hold data only between the minimum (maximum) and their inner edge: count
    # them as densities over that covered part (at least a quarter bin, to bound the noise).
    covered_first = (first.double() + 1 - first_value).clamp(0.25, 1)
    covered_last = (last_value - last.double()).clamp(0.25, 1)
    counts = counts.clone()
    rows = torch.arange(counts.shape[0], device=counts.device)
    counts[rows, first.clamp(max=bins - 1)] /= torch.where(first == last, 1.0, covered_first)
    counts[rows, last.clamp(min=0)] /= torch.where(first == last, 1.0, covered_last)
    # Dividing by the smoothed support keeps a pile-up against the edge of the support (GELU's
    # minimum, ReLU's zero) where it is instead of smearing it inwards.
    smooth = _smooth(counts) / _smooth(support).clamp(min=1e-12) * support
    best = smooth.argmax(1)
    index = best.clamp(1, bins - 2)[:, None] + torch.arange(-1, 2, device=counts.device)
    left, centre, right = torch.log(smooth.gather(1, index).clamp(min=1e-300)).unbind(1)
    curvature = left - 2 * centre + right
    shift = torch.where(curvature < 0, 0.5 * (left - right) / curvature.clamp(max=-1e-300), torch.zeros_like(centre))
    offset = best.double() + 0.5 + shift.clamp(-0.5, 0.5)
    # Densest at an edge of the support: the mode is that edge, known exactly.
    offset = torch.where(best == first, first_value, offset)
    offset = torch.where(best == last, last_value, offset)
    return torch.where(first == last, (first_value + last_value) / 2, offset)
