"""Ablation engine and gradient attribution: speed-ups over the plain loop, and attribution quality.

Arms run side by side, interleaved repetition by repetition; each speed-up is the median of the
per-repetition ratios.
The model is the zoo default (``zoo:gpt2-d128-s0``: GPT-2, 4 layers, d_model 128, 4 heads,
d_mlp 512) when its weights exist, else the same configuration randomly initialised; prompts are
16 held-out subject-verb agreement prompts of different lengths (a padded batch).

Timings go through :func:`bench.timing.interleaved` (arms in rotating order, paired ratios).

    python -m bench.ablation [--quick]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from reduce.ablate import AblationRunner, TargetMeasure, single_units
from reduce.attribution import attribute, compare_with_ablation
from reduce.baselines import Baseline, BaselineSource, UnitTable
from reduce.batching import encode, forward
from reduce.sites import resolve_sites
from reduce.target import Target

from .timing import interleaved
from .workloads import load_zoo_default

N_PROMPTS = 16


def bench_prompts(model):
    from reduce.zoo.corpus import heldout_sva_prompts

    prompts = [p for construction in ("simple", "pp", "rc") for p in heldout_sva_prompts(construction)]
    chosen = [prompts[i] for i in np.random.default_rng(0).choice(len(prompts), N_PROMPTS, replace=False)]
    batch = encode(model, [p.text for p in chosen])
    ids = lambda words: torch.tensor([model.tokenizer.convert_tokens_to_ids(w) for w in words])  # noqa: E731
    return batch, ids([p.answer for p in chosen]), ids([p.wrong for p in chosen])


def run(quick: bool = False) -> dict:
    torch.manual_seed(0)
    model, model_name = load_zoo_default()
    repeats = 3 if quick else 7
    per_plan = 16 if quick else 64  # single-unit ablations in the spread and last-layer plans
    mlp = resolve_sites(["blocks.*.mlp.hook_post"], model.n_layers)
    units = UnitTable.for_sites(model, resolve_sites(["blocks.*.mlp.hook_post", "blocks.*.attn.hook_z"], model.n_layers))
    mlp_rows = np.concatenate([units.rows(site) for site in mlp])
    batch, answers, wrongs = bench_prompts(model)
    target = Target("logit_diff")
    measure = TargetMeasure(target, answers, wrongs)
    source = BaselineSource(model, units)
    baseline = Baseline.ZERO
    offsets = source.offsets(baseline, batch, range(len(batch)))

    def runner(**options):
        engine = AblationRunner(model, units, **options)
        return engine, engine.prepare(batch, measure)

    naive, naive_prepared = runner(stack_settings=False, reuse_layers=False)
    stacked, stacked_prepared = runner(reuse_layers=False)
    reusing, reusing_prepared = runner()
    reuse_only, reuse_only_prepared = runner(stack_settings=False)

    def timed(engine, prepared, plan):
        return lambda: engine.run(prepared, plan, {baseline: offsets}, measure)

    results = {"model": model_name, "threads": torch.get_num_threads(), "prompts": len(batch), "batch_size": len(batch), "prompt_width": batch.width, "repeats": repeats, "n_layers": model.n_layers}

    # Single-unit ablations spread over every layer: stacked in the batch vs one forward each.
    spread = single_units(np.random.default_rng(1).choice(mlp_rows, per_plan, replace=False), [baseline])
    t = interleaved({"one_per_forward": timed(naive, naive_prepared, spread), "stacked": timed(stacked, stacked_prepared, spread)}, repeats)
    results["batched_ablation_units"] = len(spread)
    results["batched_ablation_timings"] = t.summary()
    results["batched_ablation_speedup"] = t.ratio("one_per_forward", "stacked")

    # Ablations in the last layer: start from the cached residual stream (past the last layer itself
    # where its units reach the stream linearly: only the final norm and head run) vs rerun every layer.
    last = single_units(units.rows(mlp[-1])[:per_plan], [baseline])
    t = interleaved(
        {
            "full_one": timed(naive, naive_prepared, last),
            "reuse_one": timed(reuse_only, reuse_only_prepared, last),
            "full_stacked": timed(stacked, stacked_prepared, last),
            "reuse_stacked": timed(reusing, reusing_prepared, last),
        },
        repeats,
    )
    results["layer_reuse_timings"] = t.summary()
    results["layer_reuse_speedup"] = t.ratio("full_stacked", "reuse_stacked")
    results["layer_reuse_speedup_one_per_forward"] = t.ratio("full_one", "reuse_one")
    results["layer_reuse_goal"] = 0.8 * model.n_layers

    # Exact single-unit effects of every MLP neuron: all tricks together vs the naive loop
    # (no untimed warm-up round: the runners are warm, and the naive sweep is the longest arm here).
    sweep_rows = mlp_rows if not quick else np.concatenate([units.rows(site)[:8] for site in mlp])
    sweep = single_units(sweep_rows, [baseline])
    t = interleaved({"naive": timed(naive, naive_prepared, sweep), "all_tricks": timed(reusing, reusing_prepared, sweep)}, 1, warmup=0)
    results["sweep_units"] = len(sweep)
    results["sweep_naive_s"] = t.median("naive")
    results["sweep_all_tricks_s"] = t.median("all_tricks")
    results["sweep_vs_naive"] = t.ratio("naive", "all_tricks")

    # Gradient attribution of every unit vs one plain forward of the same batch.
    t = interleaved({"forward": lambda: torch.no_grad()(forward)(model, batch), "attribution": lambda: attribute(model, batch, target, units, offsets, answer_ids=answers, wrong_ids=wrongs)}, max(repeats, 5))
    results["attribution_timings"] = t.summary()
    results["attribution_cost"] = t.ratio("attribution", "forward")

    exact = reusing.run(reusing_prepared, sweep, {baseline: offsets}, measure)["target"] - reusing_prepared.clean["target"][None]
    for steps, name in ((None, "attribution"), (8, "integrated_gradients_8")):
        estimate = attribute(model, batch, target, units, offsets, answer_ids=answers, wrong_ids=wrongs, steps=steps).values[:, sweep_rows]
        scores = compare_with_ablation(estimate.mean(0), exact.mean(1), top_k=20)
        results[f"{name}_spearman"] = scores["spearman"]
        results[f"{name}_top20_overlap"] = scores["top_k_overlap"]
        results[f"{name}_sign_agreement"] = scores["sign_agreement"]
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the machine is shared)")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    print(json.dumps(run(arguments.quick), indent=2))
