"""Streaming per-unit statistics: count, mean, variance, min, max, histogram and peak (mode).

Everything is per unit (no Python loop over units) and accumulated in float64: moments merge with Chan's
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

import math

import numba
import numpy as np
import torch

# Levels never go finer than 2**-LEVEL_SPAN times a unit's largest magnitude, so a constant
# unit (zero range) still gets a finite bin and cell indices stay far inside int64.
LEVEL_SPAN = 45
_SMOOTHING = (1.0, 4.0, 6.0, 4.0, 1.0)
_NO_LEVEL = np.iinfo(np.int64).min  # "no floor" for a unit's level
MAX_BINS = 2**16  # bin indices travel as uint16 between the binning and counting passes
# Bin indices are computed a tile at a time, then counted (see _accumulate_batch): 64 units
# (a cache line of uint8 indices) by 256 rows, 16 KiB, which stays in L1 cache.
_TILE_UNITS = 64
_TILE_ROWS = 256
_TALLY_ROWS = np.iinfo(np.uint16).max  # rows a uint16 tally of counts holds


class RunningStats:
    """Streaming statistics of ``n_units`` units, updated with ``(n, n_units)`` batches of values.

    Attributes after any updates: ``count`` (per unit), ``mean``, ``var`` (population variance),
    ``std``, ``min``, ``max``, ``histogram`` ``(n_units, bins)`` with ``edges`` ``(n_units, bins + 1)``,
    and :meth:`peak`. :meth:`merge` combines two; :meth:`concat` stacks unit sets;
    :meth:`to_dataset` / :meth:`from_dataset` save and restore them exactly.
    """

    def __init__(self, n_units: int, bins: int = 256):
        if bins < 4 or bins % 2 or bins > MAX_BINS:
            raise ValueError(f"bins must be an even number from 4 to {MAX_BINS}, got {bins}")
        self.bins = bins
        zeros = lambda dtype: torch.zeros(n_units, dtype=dtype)  # noqa: E731
        self.count = zeros(torch.int64)
        self._mean = zeros(torch.float64)
        self._m2 = zeros(torch.float64)
        self._min = torch.full((n_units,), torch.inf, dtype=torch.float64)
        self._max = torch.full((n_units,), -torch.inf, dtype=torch.float64)
        self.histogram = torch.zeros(n_units, bins, dtype=torch.int64)
        self.level = zeros(torch.int64)
        self.start = zeros(torch.int64)

    @property
    def n_units(self) -> int:
        return int(self.count.shape[0])

    # -- accumulation ---------------------------------------------------------------------

    def update(self, values, rows=None) -> "RunningStats":
        """Add ``values`` of shape ``(n, n_units)``, one row per token; ``rows``: an optional
        ``(n,)`` boolean mask of the rows to count (e.g. real, non-special tokens)."""
        values = _as_float_array(values)
        if values.ndim != 2 or values.shape[1] != self.n_units:
            raise ValueError(f"expected values of shape (n, {self.n_units}), got {tuple(values.shape)}")
        if rows is not None:
            rows = np.asarray(rows, dtype=bool)
            if rows.shape != (len(values),):
                raise ValueError(f"rows must be a boolean mask of shape ({len(values)},), got {rows.shape}")
            if not rows.all():
                values = values[rows]
        if len(values) == 0:
            return self
        state = (self.count, self._mean, self._m2, self._min, self._max, self.level, self.start, self.histogram)
        cells = np.empty((_TILE_ROWS, _TILE_UNITS), dtype=np.uint8 if self.bins <= 256 else np.uint16)
        if not _accumulate_batch(values, *(tensor.numpy() for tensor in state), cells):
            raise ValueError("values must be finite (NaN or infinity would have no histogram bin)")
        return self

    def merge(self, other: "RunningStats") -> "RunningStats":
        """Add another accumulator of the same units (e.g. from another process) into this one."""
        if other.n_units != self.n_units or other.bins != self.bins:
            raise ValueError("can only merge statistics of the same units and bin count")
        count, mean, m2, low, high, histogram, level, start = (
            getattr(other, name) for name in ("count", "_mean", "_m2", "_min", "_max", "histogram", "level", "start")
        )
        arriving = (count > 0).numpy()
        self._fit_window(np.minimum(self._min.numpy(), low.numpy()), np.maximum(self._max.numpy(), high.numpy()), arriving=arriving, at_least=np.where(arriving, level.numpy(), _NO_LEVEL))
        _add_rebinned(self.histogram.numpy(), histogram.numpy(), level.numpy(), start.numpy(), self.level.numpy(), self.start.numpy())
        _merge_moments(*(tensor.numpy() for tensor in (self.count, self._mean, self._m2, self._min, self._max, count, mean, m2, low, high)))
        return self

    @classmethod
    def concat(cls, parts: list["RunningStats"]) -> "RunningStats":
        """One accumulator over the units of ``parts`` in order (e.g. one per site)."""
        bins = {p.bins for p in parts}
        if len(bins) != 1:
            raise ValueError("can only concatenate statistics with the same bin count")
        out = cls(0, bins.pop())
        for name in ("count", "_mean", "_m2", "_min", "_max", "histogram", "level", "start"):
            setattr(out, name, torch.cat([getattr(p, name) for p in parts]))
        return out

    def _fit_window(self, low, high, *, arriving, at_least=None) -> None:
        """Before data ``arriving`` per unit: move each window (and its counts) so [low, high] fits,
        coarsening the bins (never refining them) as far as needed; ``at_least``: a level floor per unit."""
        at_least = np.full(self.n_units, _NO_LEVEL) if at_least is None else np.ascontiguousarray(at_least, dtype=np.int64)
        _fit_windows(low, high, (self.count > 0).numpy(), arriving, at_least, self.level.numpy(), self.start.numpy(), self.histogram.numpy())

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
        cells = self.start[:, None] + torch.arange(self.bins + 1)
        return cells.double() * self.bin_width[:, None]

    def peak(self, method: str = "refined") -> torch.Tensor:
        """The modal value per unit (``"naive"``: fullest bin's centre; ``"refined"``: see module doc)."""
        level, start = self.level.numpy(), self.start.numpy()
        if method == "naive":
            offsets = self.histogram.argmax(1).double().numpy() + 0.5
        elif method == "refined":
            offsets = _refined_offsets(self.histogram.numpy(), level, start, self._min.numpy(), self._max.numpy())
        else:
            raise ValueError(f"method must be 'naive' or 'refined', got {method!r}")
        return torch.from_numpy(_values_at_offsets(offsets, self.count.numpy(), level, start))

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
    def from_dataset(cls, dataset) -> "RunningStats":
        """Restore an accumulator saved with :meth:`to_dataset` (it can keep accumulating)."""
        bins = int(dataset.sizes["bin"])
        out = cls(int(dataset.sizes["unit"]), bins)
        tensor = lambda name, dtype: torch.as_tensor(np.asarray(dataset[name].values), dtype=dtype)  # noqa: E731
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
    def load(cls, path) -> "RunningStats":
        import xarray as xr

        return cls.from_dataset(xr.load_dataset(path, engine="h5netcdf"))


# -- compiled kernels ------------------------------------------------------------------------
# Loops over units (and, for a batch, its tokens) compiled with numba: a loop per unit costs no
# more than the vectorised tensor code it replaced and avoids its temporaries; compiled once per
# dtype and cached on disk, and free of the GIL, so the recorder's writer thread runs them
# beside the next forward.


def _as_float_array(values) -> np.ndarray:
    """A C-contiguous float32 or float64 numpy view (or copy) of a tensor or array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()  # exact; half precision would overflow when scaled to cells
        values = values.numpy()
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float32 if values.dtype.itemsize <= 4 else np.float64)
    return np.ascontiguousarray(values)


@numba.njit(nogil=True, cache=True)
def _accumulate_batch(values, count, mean, m2, minimum, maximum, level, start, histogram, cells):
    """Add a batch of values to the counts and moments, in place; False (nothing changed) when
    any value is NaN or infinite.

    Three passes, each at the speed of its own loop: the batch's range (:func:`_batch_range`);
    then each window the range leaves moves once (:func:`_move_window`: its counts so far are
    coarsened without loss, so windows end exactly as when fitted to all data at once); then,
    a tile of units at a time, moments are summed and values binned into ``cells`` (both
    vectorised over the tile; the bin is ``floor(value * 2**-level) - start``, an exact
    power-of-two scaling; ``start`` as a float64 keeps the loop vectorised; the clamp only
    keeps memory safe) and counted (:func:`_count_cells`). Sums are of deviations from the
    first row, which lies inside the data, so one pass loses nothing that matters in float64.

    Where memory goes is what sets the speed. A tile's row of bin indices is one cache line and
    its rows follow each other (rows of a buffer as wide as the batch, read down a column, lie a
    power-of-two stride apart for the usual unit counts and evict each other from the cache).
    A batch with at least as many rows as bins is counted into a small uint16 tally that stays
    in cache, then added to the histograms in one sequential pass, instead of incrementing
    histograms that, for many units, are far out in memory.
    """
    n, units = values.shape
    low, high = _batch_range(values)
    if low is None:
        return False
    bins = histogram.shape[1]
    scale = _powers_of_two(-level)
    for j in range(units):
        lowest, highest = min(minimum[j], low[j]), max(maximum[j], high[j])
        if not (count[j] > 0 and _window_holds(lowest, highest, scale[j], start[j], bins)):
            _move_window(j, lowest, highest, count[j] > 0, _NO_LEVEL, level, start, histogram)
            scale[j] = math.ldexp(1.0, -level[j])
    shift, sums, squares = values[0].astype(np.float64), np.zeros(units), np.zeros(units)
    offset = start.astype(np.float64)
    tile_rows, tile_units = cells.shape
    last = np.float64(bins - 1)
    tallied = bins <= n
    tally = np.zeros((tile_units if tallied else 0, bins), dtype=np.uint16)
    for first in range(0, units, tile_units):
        end, pending = min(first + tile_units, units), 0
        tile_shift, tile_sums, tile_squares = shift[first:end], sums[first:end], squares[first:end]
        tile_scale, tile_offset = scale[first:end], offset[first:end]
        for block in range(0, n, tile_rows):
            filled = min(tile_rows, n - block)
            for k in range(filled):
                row, binned = values[block + k, first:end], cells[k]
                for j in range(end - first):
                    value = np.float64(row[j])
                    deviation = value - tile_shift[j]
                    tile_sums[j] += deviation
                    tile_squares[j] += deviation * deviation
                    binned[j] = min(max(np.floor(value * tile_scale[j]) - tile_offset[j], 0.0), last)
            if not tallied:
                _count_cells(cells, filled, end - first, histogram[first:end])
                continue
            if pending + filled > _TALLY_ROWS:
                _add_tally(tally, histogram[first:end])
                pending = 0
            _count_cells(cells, filled, end - first, tally)
            pending += filled
        if tallied:
            _add_tally(tally, histogram[first:end])
    batch_m2 = np.maximum(squares - sums * sums / n, 0.0)
    _merge_moments(count, mean, m2, minimum, maximum, np.full(units, n), shift + sums / n, batch_m2, low.astype(np.float64), high.astype(np.float64))
    return True


@numba.njit(nogil=True, cache=True)
def _batch_range(values):
    """Per unit, the minimum and maximum, in the values' own precision (exact, and twice as many
    per vector for float32); ``(None, None)`` when any value is NaN or infinite: ``value - value``
    is 0 for every finite value, and stays NaN in the running check."""
    low, high = values[0].copy(), values[0].copy()
    check = np.zeros_like(low)
    for k in range(values.shape[0]):  # indexed rows: numba vectorises the loop below, not one over an iterator
        row = values[k]
        for j in range(len(row)):
            value = row[j]
            check[j] += value - value
            low[j], high[j] = min(low[j], value), max(high[j], value)
    for j in range(len(check)):
        if check[j] != 0:
            return None, None
    return low, high


@numba.njit(nogil=True, cache=True)
def _add_tally(tally, histogram):
    """Add the tally of each unit to its histogram (row by row, in order), and clear it."""
    for j in range(len(histogram)):
        counts, added = histogram[j], tally[j]
        for i in range(len(counts)):
            counts[i] += added[i]
            added[i] = 0


@numba.njit(nogil=True, cache=True)
def _count_cells(cells, rows, units, histogram):
    """Count the first ``rows`` rows of bin indices of ``units`` units into their histograms,
    four units at a time: consecutive increments go to different units, so none waits on the
    one before (a unit's few busy bins would make each increment wait on the last), and the four
    histograms stay in L1 cache."""
    for first in range(0, units - units % 4, 4):
        h0, h1, h2, h3 = histogram[first], histogram[first + 1], histogram[first + 2], histogram[first + 3]
        for k in range(rows):
            binned = cells[k]
            h0[binned[first]] += 1
            h1[binned[first + 1]] += 1
            h2[binned[first + 2]] += 1
            h3[binned[first + 3]] += 1
    for j in range(units - units % 4, units):
        for k in range(rows):
            histogram[j, cells[k, j]] += 1


@numba.njit(nogil=True, cache=True)
def _merge_moments(count, mean, m2, minimum, maximum, other_count, other_mean, other_m2, other_min, other_max):
    """Chan's parallel update, unit by unit, in place: the one formula that streaming a batch and
    merging an accumulator share, so a batch merged adds bit for bit what the batch streamed adds."""
    for j in range(len(count)):
        total = count[j] + other_count[j]
        weight = other_count[j] / max(total, 1)
        delta = other_mean[j] - mean[j]
        mean[j] = mean[j] + delta * weight
        m2[j] = m2[j] + other_m2[j] + delta * delta * count[j] * weight
        count[j] = total
        minimum[j] = min(minimum[j], other_min[j])
        maximum[j] = max(maximum[j], other_max[j])


@numba.njit(cache=True)
def _level_floor(low, high):
    magnitude = max(abs(low), abs(high))
    if not np.isfinite(magnitude):
        magnitude = 0.0
    return np.int64(math.frexp(magnitude)[1]) - LEVEL_SPAN


@numba.njit(cache=True)
def _cell(value, level):
    return np.int64(math.floor(math.ldexp(value, -level)))


@numba.njit(cache=True)
def _level_for(low, high, bins, floor):
    """The finest level at which [low, high] covers at most ``bins`` cells (never below ``floor``)."""
    span = high - low if high >= low else 0.0
    # At width w, [low, high] touches at most span / w + 2 cells, so this level always fits...
    safe = floor if span == 0.0 else max(np.int64(math.ceil(math.log2(span / (bins - 2)))), floor)
    # ...and often the one below does too.
    finer = max(safe - 1, floor)
    return finer if _cell(high, finer) - _cell(low, finer) + 1 <= bins else safe


@numba.njit(cache=True)
def _rebin_into(out, counts, level, start, new_level, new_start):
    """Add the counts of cells (level, start + i) into the coarser cells (new_level, new_start + k)."""
    bins = len(counts)
    shift = min(max(new_level - level, 0), 62)
    for i in range(bins):
        if counts[i]:
            out[min(max(((start + i) >> shift) - new_start, 0), bins - 1)] += counts[i]


@numba.njit(nogil=True, cache=True)
def _fit_windows(low, high, had_data, arriving, at_least, level, start, histogram):
    """Move each window that [low, high] leaves (its counts with it): see :meth:`RunningStats._fit_window`."""
    for j in range(histogram.shape[0]):
        if had_data[j] or arriving[j]:
            _move_window(j, low[j], high[j], had_data[j], at_least[j], level, start, histogram)


@numba.njit(cache=True)
def _window_holds(low, high, scale, start, bins):
    """Whether [low, high] lies in the window of ``bins`` cells of width ``1 / scale`` from cell ``start``."""
    return np.floor(low * scale) >= start and np.floor(high * scale) < start + bins


@numba.njit(cache=True)
def _powers_of_two(exponents):
    """``2.0 ** exponents``, exact: the bits of each float64 are written directly (a loop that
    vectorises, where ``ldexp`` is a call per element), except beyond the normal range."""
    bits = np.empty(len(exponents), dtype=np.int64)
    for j in range(len(exponents)):
        bits[j] = (min(max(exponents[j], -1022), 1023) + 1023) << 52
    powers = bits.view(np.float64)
    for j in range(len(exponents)):
        if not -1022 <= exponents[j] <= 1023:
            powers[j] = math.ldexp(1.0, exponents[j])
    return powers


@numba.njit(nogil=True, cache=True)
def _move_window(j, low, high, had_data, at_least, level, start, histogram):
    """Unit ``j``'s window, moved (its counts with it) if [low, high] leaves it."""
    bins = histogram.shape[1]
    if had_data and at_least <= level[j] and _window_holds(low, high, math.ldexp(1.0, -level[j]), start[j], bins):
        return  # the usual case once ranges have settled, decided without finding the finest level
    floor = _level_floor(low, high)
    new_level = max(_level_for(low, high, bins, floor), level[j] if had_data else floor, at_least)
    first, last = _cell(low, new_level), _cell(high, new_level)
    if new_level == level[j] and first >= start[j] and last < start[j] + bins:
        return
    # Centre the data so later batches have room to grow either way before rebinning.
    new_start = first - (bins - (last - first + 1)) // 2
    if had_data:
        moved = np.zeros(bins, dtype=histogram.dtype)
        _rebin_into(moved, histogram[j], level[j], start[j], new_level, new_start)
        histogram[j] = moved
    level[j], start[j] = new_level, new_start


@numba.njit(nogil=True, cache=True)
def _add_rebinned(histogram, counts, levels, starts, level, start):
    """Every unit's ``counts`` (at its ``levels`` / ``starts``) added into ``histogram`` at ``level`` / ``start``."""
    for j in range(histogram.shape[0]):
        _rebin_into(histogram[j], counts[j], levels[j], starts[j], level[j], start[j])

@numba.njit(cache=True)
def _log_density(smooth, i, first, last):
    return math.log(max(smooth[i] if first <= i <= last else 0.0, 1e-300))


@numba.njit(cache=True)
def _taps_on_support(i, first, last):
    """The smoothing weight that falls inside the support [first, last] for the taps around bin ``i``."""
    covered = 0.0
    for tap in range(-2, 3):
        if first <= i + tap <= last:
            covered += _SMOOTHING[tap + 2]
    return covered


@numba.njit(nogil=True, cache=True)
def _refined_offsets(histogram, level, start, minimum, maximum):
    """The refined mode of every unit as a bin offset (:func:`_refined_modes`), from its exact
    minimum and maximum in values."""
    scale = _powers_of_two(-level)
    return _refined_modes(histogram, minimum * scale - start, maximum * scale - start)


@numba.njit(nogil=True, cache=True)
def _values_at_offsets(offsets, count, level, start):
    """Bin offsets (0 = left edge of bin 0) as values, exactly; NaN for a unit with no data."""
    return np.where(count > 0, (start + offsets) * _powers_of_two(level), np.nan)


@numba.njit(nogil=True, cache=True)
def _refined_modes(counts, first_value, last_value):
    """Fractional bin offset of the mode (0 = left edge of bin 0) per row of ``counts``; see the module doc.

    ``first_value`` / ``last_value``: the exact minimum and maximum, as bin offsets.
    """
    units, bins = counts.shape
    w0, w1, w2 = _SMOOTHING[0], _SMOOTHING[1], _SMOOTHING[2]  # symmetric taps w0 w1 w2 w1 w0
    inverse_total = 1.0 / (2 * w0 + 2 * w1 + w2)  # 1/16: dividing by the full support is exact as this product
    offsets = np.full(units, np.nan)
    # Densities padded by two zero bins on each side of the support: the five taps need no bounds.
    density, smooth = np.empty(bins + 4), np.empty(bins)
    for j in range(units):
        row = counts[j]
        first = 0
        while first < bins and row[first] == 0:
            first += 1
        if first == bins:
            continue
        last = bins - 1
        while row[last] == 0:
            last -= 1
        if first == last:
            offsets[j] = (first_value[j] + last_value[j]) / 2
            continue
        # Views over the support, indexed from 0, so the loops below vectorise.
        width = last - first + 1
        padded, values = density[first : last + 5], row[first : last + 1]
        padded[0] = padded[1] = padded[width + 2] = padded[width + 3] = 0.0
        for m in range(width):
            padded[m + 2] = values[m]
        # The end bins hold data only between the minimum (maximum) and their inner edge: count
        # them as densities over that covered part (at least a quarter bin, to bound the noise).
        padded[2] /= min(max(first + 1 - first_value[j], 0.25), 1.0)
        padded[width + 1] /= min(max(last_value[j] - last, 0.25), 1.0)
        # Smoothed density over smoothed support: a pile-up against the edge of the support
        # (GELU's minimum, ReLU's zero) stays where it is instead of being smeared inwards.
        # Inside, every tap is on the support (a product by the exact power of two 1/16); the
        # two bins at each end divide by the taps they keep.
        smoothed = smooth[first : last + 1]
        for m in range(width):
            smoothed[m] = w0 * padded[m] + w1 * padded[m + 1] + w2 * padded[m + 2] + w1 * padded[m + 3] + w0 * padded[m + 4]
        for m in range(2, width - 2):
            smoothed[m] *= inverse_total
        for m in range(min(2, width)):
            smoothed[m] /= _taps_on_support(first + m, first, last)  # the centre tap always counts: >= w2
        for m in range(max(width - 2, 2), width):
            smoothed[m] /= _taps_on_support(first + m, first, last)
        top = smoothed[0]
        for m in range(1, width):
            top = max(top, smoothed[m])
        best = first
        while smooth[best] != top:  # the first bin at the top, as a running argmax would pick
            best += 1
        centre = min(max(best, 1), bins - 2)
        left, middle, right = _log_density(smooth, centre - 1, first, last), _log_density(smooth, centre, first, last), _log_density(smooth, centre + 1, first, last)
        curvature = left - 2 * middle + right
        shift = 0.5 * (left - right) / min(curvature, -1e-300) if curvature < 0 else 0.0
        offsets[j] = best + 0.5 + min(max(shift, -0.5), 0.5)
        # Densest at an edge of the support: the mode is that edge, known exactly.
        if best == first:
            offsets[j] = first_value[j]
        if best == last:
            offsets[j] = last_value[j]
    return offsets
