"""The same unit sites saved with nnsight and with TransformerLens, side by side with ``reduce``.

For each workload (:mod:`bench.workloads`), on the same weights (each peer wraps its own deep
copy of the model, so nothing a peer changes in a module, such as TransformerLens switching
attention to its eager implementation, reaches another arm) and the same batches:

- ``reduce_record``: :func:`bench.record_overhead.record_to_memory` (hooks, forward, one numpy copy per batch);
- ``nnsight``: ``model.trace({"input_ids", "attention_mask"})`` with ``.input.save()`` on every
  MLP and attention out-projection, in execution order (nnsight's documented way to read a
  module's input); ``nnsight_stop``: the same with ``tracer.stop()`` after the last save, so the
  layers after it (final norm, LM head) are skipped;
- ``transformerlens``: ``TransformerBridge.run_with_cache(input_ids, attention_mask=...,
  names_filter=[blocks.L.mlp.hook_post, blocks.L.attn.hook_z, ...])``; ``transformerlens_stop``:
  the same with ``stop_at_layer=n_layers`` (nothing after the last block runs).

TransformerLens 4 removed ``HookedTransformer`` / ``HookedEncoder``; its documented replacement is
``TransformerBridge.boot_transformers(name, hf_model=..., tokenizer=...)``, which wraps an
already loaded HuggingFace model offline (raw weights, like ``from_pretrained_no_processing``).
Its BERT adapter expects ``BertForMaskedLM``; MiniLM's checkpoint is a bare ``BertModel``, so
for MiniLM the bridge boots from the checkpoint folder, which loads the same encoder weights
under an MLM head the checkpoint does not have (randomly initialised; the ``_stop`` arm skips it).

Ratios are peer time over reduce's time, for the peer arm that computes what reduce's forward
computes (``nnsight_vs_record``, ``transformerlens_vs_record``; goal >= 1.0 on every model and
>= 1.15 on the zoo default). ``reduce.record`` ends each forward at the last site it needs when
its target does not read the output (the workloads' neuron target), so the matched arm is then
the stopped one; it is the full forward for a target that reads the logits. Both arms' ratios
are reported beside it (``full_forward_vs_record``, ``stopped_vs_record``). Each peer's saved sites are checked against reduce's on the first batch
(``max_abs_difference``).

``transformerlens_stats_vs_ours``: what a TransformerLens user does for the mean and the peak of
every unit (cache the sites over the whole prompt set, then per unit the mean and the mode of a
``torch.histc`` histogram, :func:`bench.peak.seed_paper_peaks`) over reduce's streaming statistics
(:func:`bench.record_overhead.record_with_stats`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings

import torch

from .peak import BINS, seed_paper_peaks
from .record_overhead import record_to_memory, record_with_stats
from .timing import interleaved


def _quiet():
    """Peers' loading chatter (deprecation notes, progress bars) kept off the benchmark's output."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    logging.disable(logging.WARNING)
    stack.callback(logging.disable, logging.NOTSET)
    return stack


def out_projection_paths(workload) -> list[tuple[str, str]]:
    """(site name, dotted module path from the HF model) of every unit site, in execution order
    (attention before MLP in every layer of GPT-2 and BERT blocks)."""
    model = workload.model
    module = model.module
    prefix = "" if module.base_model is module else module.base_model_prefix
    layers = ".".join(part for part in (prefix, model.arch.layers) if part)
    paths = []
    for layer in range(model.n_layers):
        paths.append((f"blocks.{layer}.attn.hook_z", f"{layers}.{layer}.{model.arch.attn_out}"))
        paths.append((f"blocks.{layer}.mlp.hook_post", f"{layers}.{layer}.{model.arch.mlp_out}"))
    return paths


def _envoy(model, path: str):
    """nnsight's envoy of the module at ``path``. A submodule named like something nnsight serves on
    every module (BERT's ``output``) is renamed by nnsight to ``E_output``, as its warning says."""
    import inspect

    from nnsight.intervention.envoy import Envoy

    node = model
    for part in path.split("."):
        if part.isdigit():
            node = node[int(part)]
            continue
        if inspect.isdatadescriptor(getattr(Envoy, part, None)):
            part = f"{Envoy.OVERLOAD_PREFIX}{part}"
        node = getattr(node, part)
    return node


class NnsightRecorder:
    """nnsight's ``TransformersModel`` around a copy of the workload's model."""

    name = "nnsight"

    def __init__(self, workload):
        from nnsight import TransformersModel

        self.paths = out_projection_paths(workload)
        self.adds_head = False  # it wraps the very module reduce runs
        task = None if workload.model.causal else "feature-extraction"  # a bare encoder: nnsight cannot infer its task
        with _quiet():
            self.model = TransformersModel(copy.deepcopy(workload.model.module), tokenizer=copy.deepcopy(workload.tokenizer), task=task)
        self.configuration = f"nnsight {_version('nnsight')}: TransformersModel(model copy, task={task or 'inferred'}); trace(encoding) + .input.save() per out-projection"

    def save(self, batch, stop: bool = False) -> dict[str, torch.Tensor]:
        saved = {}
        with self.model.trace({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}) as tracer:
            for name, path in self.paths:
                saved[name] = _envoy(self.model, path).input.save()
            if stop:
                tracer.stop()
        return saved


class TransformerLensRecorder:
    """TransformerLens's ``TransformerBridge`` around a copy of the workload's model (or its checkpoint folder)."""

    name = "transformerlens"

    def __init__(self, workload):
        from transformer_lens.model_bridge import TransformerBridge

        model = workload.model
        self.names = [site.name for site in workload.sites]
        self.n_layers = model.n_layers
        tokenizer = copy.deepcopy(workload.tokenizer)
        with _quiet():
            try:
                self.bridge = TransformerBridge.boot_transformers(model.path or workload.key, hf_model=copy.deepcopy(model.module), tokenizer=tokenizer, device="cpu")
                how = "boot_transformers(hf_model=model copy)"
            except (AttributeError, KeyError, ValueError) as error:
                if not model.path:
                    raise
                # e.g. a bare BertModel: the BERT adapter wants BertForMaskedLM, which it loads itself.
                self.bridge = TransformerBridge.boot_transformers(model.path, tokenizer=tokenizer, device="cpu")
                how = f"boot_transformers(checkpoint folder) as {type(self.bridge.original_model).__name__} (hf_model= refused: {type(error).__name__}: {str(error)[:120]})"
        self.bridge.eval()
        # Loaded as another class (BertForMaskedLM for a BertModel): its forward adds an output head.
        self.adds_head = type(self.bridge.original_model) is not type(model.module)
        self.configuration = f"transformer-lens {_version('transformer-lens')}: TransformerBridge.{how}; run_with_cache(input_ids, attention_mask=, names_filter=sites)"

    def save(self, batch, stop: bool = False) -> dict[str, torch.Tensor]:
        _, cache = self.bridge.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask, names_filter=self.names, stop_at_layer=self.n_layers if stop else None)
        return {name: cache[name] for name in self.names}


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _max_difference(saved: dict, reference: dict, real: torch.Tensor) -> float:
    worst = 0.0
    for name, values in reference.items():
        ours = values[real]
        theirs = saved[name].reshape(values.shape)[real]
        worst = max(worst, float((theirs.float() - ours.float()).abs().max()))
    return worst


def _reference_sites(workload, batch) -> dict[str, torch.Tensor]:
    from reduce.batching import forward
    from reduce.hooks import hooked

    with torch.inference_mode(), hooked(workload.model, record=workload.sites) as recorded:
        forward(workload.model, batch)
        return {name: value.clone() for name, value in recorded.items()}


def build_recorders(workload) -> tuple[dict, dict]:
    """({peer name: recorder}, {peer name: why it cannot run this model})."""
    recorders, failures = {}, {}
    for peer in (NnsightRecorder, TransformerLensRecorder):
        try:
            recorders[peer.name] = peer(workload)
        except Exception as error:  # a peer that cannot load this model is a result, not a crash
            failures[peer.name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    return recorders, failures


def _all_batches(recorder, workload, stop: bool):
    with torch.inference_mode():
        for batch in workload.batches:
            recorder.save(batch, stop=stop)


def transformerlens_mean_and_peak(recorder, workload, bins: int = BINS):
    """A TransformerLens user's mean and peak of every unit: cache every batch's sites (real tokens),
    concatenate over the prompt set, then the mean and a per-unit ``torch.histc`` mode."""
    cached = {name: [] for name in recorder.names}
    with torch.inference_mode():
        for batch in workload.batches:
            cache = recorder.save(batch)
            real = batch.attention_mask.bool()
            for name in recorder.names:
                cached[name].append(cache[name][real].reshape(int(real.sum()), -1))
    results = {}
    for name, parts in cached.items():
        values = torch.cat(parts)
        results[name] = (values.mean(0), seed_paper_peaks(values, bins))
    return results


def run_workload(workload, repetitions: int, *, with_stats: bool = True) -> dict:
    recorders, failures = build_recorders(workload)
    result = {**workload.describe(), "peers": {}, "not_run": dict(failures)}
    first = workload.batches[0]
    reference = _reference_sites(workload, first)
    real = first.attention_mask.bool()
    arms = {"reduce_record": lambda: record_to_memory(workload)}
    for name, recorder in list(recorders.items()):
        try:
            with torch.inference_mode():
                difference = _max_difference(recorder.save(first), reference, real)
                difference_stop = _max_difference(recorder.save(first, stop=True), reference, real)
        except Exception as error:
            failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            result["not_run"][name] = failures[name]
            del recorders[name]
            continue
        result["peers"][name] = {"configuration": recorder.configuration, "max_abs_difference": difference, "max_abs_difference_stop": difference_stop}
        arms[name] = lambda recorder=recorder: _all_batches(recorder, workload, stop=False)
        arms[f"{name}_stop"] = lambda recorder=recorder: _all_batches(recorder, workload, stop=True)
    timings = interleaved(arms, repetitions)
    result["timings"] = timings.summary()
    for name in recorders:
        full, stopped = timings.ratio_summary(name, "reduce_record"), timings.ratio_summary(f"{name}_stop", "reduce_record")
        matched = full if workload.target.reads_output and not recorders[name].adds_head else stopped
        result["peers"][name].update({"vs_record": matched, "full_forward_vs_record": full, "stopped_vs_record": stopped, "adds_output_head": recorders[name].adds_head})
    if with_stats and "transformerlens" in recorders:
        recorder = recorders["transformerlens"]
        stats_timings = interleaved({"reduce_streaming_stats": lambda: record_with_stats(workload), "transformerlens_cache_then_stats": lambda: transformerlens_mean_and_peak(recorder, workload)}, max(2, repetitions // 2))
        result["stats_timings"] = stats_timings.summary()
        result["transformerlens_stats_vs_ours"] = stats_timings.ratio_summary("transformerlens_cache_then_stats", "reduce_streaming_stats")
    return result


def run(quick: bool = False, workloads=None) -> dict:
    from .workloads import zoo_workload

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on the hub
    if workloads is None:
        workloads = [zoo_workload(prompts=128 if quick else 512)]
    repetitions = 3 if quick else 7
    return {workload.key: run_workload(workload, repetitions) for workload in workloads}
