"""The ``reduce`` command line: one small function per subcommand, each a call into the Python API.

To add a subcommand, decorate a function taking the parsed arguments::

    @command("fit", "fit the reduced model of a recorded run", argument("run_dir"), *MODEL_OPTIONS)
    def fit_command(args):
        ...

Every :class:`~reduce.errors.ReduceError` becomes one line on stderr and exit status 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

from .errors import ReduceError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: tuple[tuple[tuple[str, ...], dict], ...]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def argument(*flags: str, **options) -> tuple[tuple[str, ...], dict]:
    """One ``add_argument`` call, as data."""
    return flags, options


def command(name: str, help: str, *arguments):
    """Register the decorated function as subcommand ``name``."""

    def register(function):
        COMMANDS[name] = Command(name, help, arguments, function)
        return function

    return register


CONDITION = argument("condition", metavar="COND.toml", help="condition file")
MODEL_OPTIONS = (
    argument("--device", help="override model.device (e.g. cpu, cuda, cuda:1)"),
    argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"), help="override model.dtype"),
)


def _condition(args):
    from .condition import load_condition

    return load_condition(args.condition).with_overrides(device=args.device, dtype=args.dtype)


@command("check", "validate a condition and show what it resolves to (loads the model)", CONDITION, *MODEL_OPTIONS)
def check_command(args) -> None:
    from .condition import resolve

    print(describe(resolve(_condition(args))))


def describe(resolved) -> str:
    """What a resolved condition amounts to: model, prompts, target, sites and units."""
    condition, model, prompts = resolved.condition, resolved.model, resolved.prompts
    position = condition.target.position
    units = sum(model.n_units(site) for site in resolved.unit_sites)
    dtype = str(next(model.module.parameters()).dtype).removeprefix("torch.")
    few = lambda values: ", ".join(sorted(set(values))[:6]) + (", ..." if len(set(values)) > 6 else "")  # noqa: E731
    lines = [
        f"condition  {condition.name} ({condition.path})",
        f"model      {model.name}: {model.arch.family}, {model.n_layers} layers, d_model {model.d_model}, "
        f"{model.d_mlp} MLP neurons and {model.n_heads} heads x {model.d_head} per layer; {dtype} on {model.device}",
        f"prompts    {len(prompts)}, {int(prompts.lengths.min())}-{int(prompts.lengths.max())} tokens; first: {prompts.texts[0]!r}",
    ]
    if prompts.answers is not None:
        lines.append(f"answers    {few(prompts.answers)}" + (f" | wrong: {few(prompts.wrongs)}" if prompts.wrongs else ""))
    lines += [
        f"target     {resolved.target.name} " + ("at every position" if position == "all" else f"at position {position}"),
        f"sites      {len(resolved.sites)}: {_site_summary(resolved.sites)}",
        f"units      {units} in the unit table; {condition.record.bins} histogram bins, batch size {condition.record.batch_size}",
    ]
    lines += [f"label      {name}: {few(values)}" for name, values in prompts.labels.items()]
    return "\n".join(lines)


def _site_summary(sites) -> str:
    by_kind: dict[str, list[int]] = {}
    for site in sites:
        by_kind.setdefault(site.name.split(".", 2)[2], []).append(site.layer)
    return ", ".join(f"blocks.{{{_ranges(layers)}}}.{suffix}" for suffix, layers in by_kind.items())


def _ranges(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1 else ",".join(map(str, layers))


CLUSTER_OPTIONS = (
    argument("--scheduler", metavar="ADDRESS", help="run on the Dask cluster whose scheduler is at ADDRESS (e.g. tcp://10.0.0.5:8786)"),
    argument("--workers", type=int, metavar="N", help="run on a local Dask cluster of N worker processes"),
)


def _cluster(args):
    """A Dask client when --scheduler or --workers asks for one, else a context holding None."""
    import contextlib

    if args.scheduler is None and args.workers is None:
        return contextlib.nullcontext()
    if args.scheduler is not None and args.workers is not None:
        raise ReduceError("give --scheduler (an existing cluster) or --workers (a local one), not both", field="--workers")
    from .distributed import cluster_client

    return cluster_client(args.scheduler, args.workers)


@command(
    "record",
    "record activations, the target and unit statistics of a condition into a run directory",
    CONDITION,
    argument("--out", required=True, metavar="RUN_DIR", help="run directory"),
    *MODEL_OPTIONS,
    *CLUSTER_OPTIONS,
)
def record_command(args) -> None:
    condition = _condition(args)  # a bad condition fails before torch is imported
    from .record import ACTIVATIONS, STATS, record

    with _cluster(args) as client:
        if client is None:
            dataset = record(condition, args.out, progress=not args.quiet)
        else:
            from .distributed import record_distributed

            dataset = record_distributed(condition, args.out, client, progress=not args.quiet)
    print(f"recorded {dataset.sizes['prompt']} prompts: {os.path.join(args.out, ACTIVATIONS)}, {os.path.join(args.out, STATS)}")


@command(
    "fit-many",
    "fit a reduced model for every unit of a site (each unit the target in turn), from one recording; on a Dask cluster with --scheduler/--workers",
    CONDITION,
    argument("--out", required=True, metavar="RUN_DIR", help="run directory; each fit goes to RUN_DIR/targets/SITE.UNIT/"),
    argument("--neurons", required=True, metavar="SITE", help="the site whose units are the targets, e.g. blocks.1.mlp.hook_post"),
    argument("--units", metavar="LIST", help="only these units: e.g. 0-15,40 (default: every unit of the site)"),
    *MODEL_OPTIONS,
    *CLUSTER_OPTIONS,
)
def fit_many_command(args) -> None:
    condition = _condition(args)
    from .distributed import FIT_MANY, fit_many, neuron_targets

    targets = neuron_targets(condition, args.neurons, _unit_list(args.units) if args.units else None)
    with _cluster(args) as client:
        results = fit_many(condition, args.out, targets, client, progress=not args.quiet)
    failed = {target: outcome["error"] for target, outcome in results.items() if "error" in outcome}
    converged = sum(1 for outcome in results.values() if outcome.get("converged"))
    print(f"{len(results)} targets: {converged} converged, {len(results) - converged - len(failed)} did not, {len(failed)} could not be fitted: {os.path.join(args.out, FIT_MANY)}")
    for (site, unit), message in list(failed.items())[:10]:
        print(f"  {site}[{unit}]: {message}")


def _unit_list(text: str) -> list[int]:
    """``0-3,7`` -> [0, 1, 2, 3, 7]."""
    units: list[int] = []
    try:
        for piece in text.split(","):
            low, _, high = piece.partition("-")
            units.extend(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ReduceError(f"expected unit numbers and ranges such as 0-15,40, got {text!r}", field="--units") from None
    return units


@command(
    "inspect",
    "a unit's top activations and histogram (--site, --unit), or units ranked by selectivity for a label (--rank)",
    argument("run_dir", metavar="RUN_DIR"),
    argument("--site", help="site name, e.g. blocks.3.mlp.hook_post"),
    argument("--unit", type=int, help="flat unit index within the site"),
    argument("--top", type=int, default=20, help="rows to show (default 20)"),
    argument("--rank", metavar="LABEL", help="rank units by selectivity between two values of this prompt label"),
    argument("--values", nargs=2, metavar=("A", "B"), help="the two label values to compare (default: the label's two values)"),
    argument("--sites", default="*", metavar="PATTERN", help="with --rank: glob of sites to rank (default all)"),
)
def inspect_command(args) -> None:
    from .inspect import format_selectivity, inspect_unit, rank_selectivity

    if args.rank:
        table = rank_selectivity(args.run_dir, args.rank, args.sites, values=tuple(args.values) if args.values else None)
        print(format_selectivity(table, args.top), end="")
        return
    if args.site is None or args.unit is None:
        raise ReduceError("give --site and --unit (or --rank LABEL)", field="--site" if args.site is None else "--unit")
    report = inspect_unit(args.run_dir, args.site, args.unit, top=args.top)
    print(report.text, end="")
    print("saved " + ", ".join(str(path) for path in report.files))


OUT = argument("--out", required=True, metavar="RUN_DIR", help="run directory")


@command("ablate", "run the condition's ablation plans under every baseline into RUN_DIR/ablations.zarr", CONDITION, OUT, *MODEL_OPTIONS)
def ablate_command(args) -> None:
    from .ablate import ABLATIONS, ablate

    dataset = ablate(_condition(args), args.out, progress=not args.quiet)
    print(f"{dataset.sizes['ablation']} ablations: {os.path.join(args.out, ABLATIONS)}")


@command("fit", "fit the grouped reduced model and the unit-level circuit (records first if needed)", CONDITION, OUT, *MODEL_OPTIONS)
def fit_command(args) -> None:
    from .fit import fit

    summary = fit(_condition(args), args.out, progress=not args.quiet)
    print(_fit_line(summary))


def _fit_line(summary: dict) -> str:
    metric = summary["metric"]
    if not summary["converged"]:
        return f"{summary['target']}: the reduced model did not converge; no metrics reported"
    value, (low, high) = summary["held_out"][metric], summary["interval"][metric] if summary["interval"] else (float("nan"),) * 2
    drops = ", ".join(f"{name} -{c['drop']:.3f}" for name, c in summary["controls"].items())
    return f"{summary['target']}: held-out {metric} {value:.3f} [{low:.3f}, {high:.3f}]; control drops: {drops}; circuit: {summary['circuit']['selected_units']} units"


@command(
    "fit-arrays",
    "fit a reduced model to array data that is not a transformer (netCDF/zarr with inputs, target, history, block)",
    argument("data", metavar="DATA", help="netCDF or zarr dataset"),
    argument("--family", required=True, choices=("bernoulli", "binomial", "gaussian", "poisson")),
    argument("--out", required=True, metavar="DIR"),
    argument("--test-fraction", type=float, default=0.2),
    argument("--seed", type=int, default=0),
    argument("--bootstrap", type=int, default=50, help="bootstrap refits for confidence intervals"),
)
def fit_arrays_command(args) -> None:
    from .fit_arrays import fit_arrays

    family = "bernoulli" if args.family == "binomial" else args.family
    summary = fit_arrays(args.data, family, args.out, test_fraction=args.test_fraction, seed=args.seed, n_bootstrap=args.bootstrap)
    held_out = {k: v for k, v in summary.items() if k.startswith("test_")}
    print(f"{args.out}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in held_out.items()))


@command("validate", "predicted vs actual target under every baseline's ablations (fits first if needed)", CONDITION, OUT, *MODEL_OPTIONS)
def validate_command(args) -> None:
    from .validate import validate

    summary = validate(_condition(args), args.out, progress=not args.quiet)
    for baseline, scores in summary["baselines"].items():
        print(f"{baseline:26s} direct ρ {_fmt(scores['direct_spearman'])}  propagated ρ {_fmt(scores['propagated_spearman'])}  attribution ρ {_fmt(scores['attribution_spearman'])}")
    print(f"most faithful baseline: {summary['most_faithful_baseline']}")


def _fmt(value) -> str:
    return "  n/a" if value is None else f"{value:5.2f}"


@command(
    "run",
    "the whole pipeline (record, ablate, fit, validate, report), resumable; no condition: the bundled default",
    argument("condition", nargs="?", metavar="COND.toml", help="condition file (default: the bundled SVA condition)"),
    argument("--out", metavar="RUN_DIR", help="run directory (default runs/<condition name>)"),
    argument("--force", action="store_true", help="redo every stage"),
    *MODEL_OPTIONS,
)
def run_command(args) -> None:
    from .condition import load_condition
    from .pipeline import DEFAULT_CONDITION, run

    condition = load_condition(args.condition or DEFAULT_CONDITION).with_overrides(device=args.device, dtype=args.dtype)
    run(condition, args.out, force=args.force, progress=not args.quiet)


@command("zoo", "the bundled zoo: `reduce zoo list`, or `reduce zoo train NAME [--out DIR]`", argument("action", choices=("list", "train")), argument("name", nargs="?"), argument("--out", metavar="DIR"))
def zoo_command(args) -> None:
    from .zoo import format_zoo_table, train

    if args.action == "list":
        print(format_zoo_table(), end="")
        return
    if not args.name:
        raise ReduceError("name the zoo model to train (see `reduce zoo list`)", field="NAME")
    print(f"trained {args.name}: {train(args.name, out_dir=args.out, progress=not args.quiet)}")


@command(
    "universality",
    "fit one condition on several models and compare their reduced models: filters, transfer, matching units",
    CONDITION,
    argument("--models", nargs="+", metavar="MODEL", help="zoo:NAME, folders or hub ids (default: every zoo model trained on the condition's task, except tiny)"),
    argument("--out", required=True, metavar="DIR", help="output directory; each model is fitted in DIR/runs/NAME"),
    argument("--splits", type=int, default=2, help="random half splits of the training prompts for the within-model ceiling (default 2)"),
    argument("--top-k", type=int, default=10, help="circuit units per model to match across models (default 10)"),
    argument("--match-threshold", type=float, default=0.8, help="activation correlation a unit match needs (default 0.8)"),
    *MODEL_OPTIONS,
)
def universality_command(args) -> None:
    from .universality import universality

    headline = universality(_condition(args), args.models, args.out, progress=not args.quiet, n_splits=args.splits, top_k=args.top_k, match_threshold=args.match_threshold)
    similarity, transfer, matches = headline["similarity"], headline["transfer"], headline["unit_matches"]
    print(f"{len(headline['models'])} models: filter similarity {_fmt(similarity['mean_cross_model_halves'])} across models vs ceiling {_fmt(similarity['mean_ceiling'])}")
    print(f"transfer ratio {_fmt(transfer['mean_ratio'])} (filters only {_fmt(transfer['mean_ratio_filter_only'])})")
    print(f"unit match rate {_fmt(matches['mean_match_rate'])} (random units {_fmt(matches['mean_null_match_rate'])}); partners in the other circuit {_fmt(matches['mean_partner_in_circuit'])}")
    print(f"tables: {os.path.join(args.out, 'universality.md')}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser = argparse.ArgumentParser(prog="reduce", description="Reduced models of transformer units.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, spec in COMMANDS.items():
        sub = subcommands.add_parser(name, help=spec.help, description=spec.help, parents=[common])
        for flags, options in spec.arguments:
            sub.add_argument(*flags, **options)
        sub.set_defaults(run=spec.run)
    return parser


def main(argv=None) -> int:
    # Our own progress bars say what is happening; the libraries' would interleave with them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ReduceError as error:
        print(f"reduce {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reduce {args.command}: interrupted", file=sys.stderr)
        return 130
