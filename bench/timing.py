"""The one timing helper of every benchmark: arms run side by side, interleaved, reported as medians and ratios.

The machine these benchmarks run on is shared, so absolute seconds drift with other people's
work. Arms are therefore run in turn within each repetition (the order rotating from one
repetition to the next, so no arm always runs first or last), and a comparison is a ratio:
``Timings.ratio(a, b)`` is the median over repetitions of ``a``'s time over ``b``'s time in the
same repetition, i.e. of pairs measured back to back under the same load. The ratio of the
medians and CPU-time ratios are kept alongside.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


def timed_call(function: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result, wall seconds, CPU seconds of this process)`` of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


@dataclass
class Timings:
    """Seconds per repetition of each arm, from :func:`interleaved`."""

    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)

    @property
    def repetitions(self) -> int:
        return min((len(values) for values in self.wall.values()), default=0)

    def median(self, arm: str) -> float:
        return statistics.median(self.wall[arm])

    def median_cpu(self, arm: str) -> float:
        return statistics.median(self.cpu[arm])

    def ratio(self, numerator: str, denominator: str) -> float:
        """Median over repetitions of ``numerator``'s wall time over ``denominator``'s in the same repetition."""
        return statistics.median(a / b for a, b in zip(self.wall[numerator], self.wall[denominator]))

    def cpu_ratio(self, numerator: str, denominator: str) -> float:
        return statistics.median(a / max(b, 1e-9) for a, b in zip(self.cpu[numerator], self.cpu[denominator]))

    def ratio_summary(self, numerator: str, denominator: str) -> dict:
        """The paired ratio with the ratio of medians and the CPU-time ratio beside it."""
        return {
            "paired_median": self.ratio(numerator, denominator),
            "of_medians": self.median(numerator) / self.median(denominator),
            "cpu": self.cpu_ratio(numerator, denominator),
            "numerator": numerator,
            "denominator": denominator,
        }

    def summary(self) -> dict:
        return {
            "repetitions": self.repetitions,
            "median_s": {arm: self.median(arm) for arm in self.wall},
            "median_cpu_s": {arm: self.median_cpu(arm) for arm in self.cpu},
            "wall_s": {arm: list(values) for arm, values in self.wall.items()},
        }


def interleaved(arms: Mapping[str, Callable[[], Any]], repetitions: int, *, warmup: int = 1) -> Timings:
    """Run every arm ``warmup`` times untimed, then ``repetitions`` timed rounds of all arms in rotating order."""
    names = list(arms)
    for _ in range(warmup):
        for name in names:
            arms[name]()
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    for repetition in range(repetitions):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            _, wall, cpu = timed_call(arms[name])
            timings.wall[name].append(wall)
            timings.cpu[name].append(cpu)
    return timings
