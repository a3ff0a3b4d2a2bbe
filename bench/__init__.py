"""Benchmarks of ``reduce``: one entry point, ``python -m bench [--quick]`` (see ``bench/__main__.py``).

Every benchmark module exposes ``run(quick: bool) -> dict``; timings go through
:mod:`bench.timing` (arms interleaved, medians, paired ratios).
"""
