"""Held-out metrics of a zoo model, as recorded in its card and recomputed by tests.

Prompts run through :mod:`reduce.batching` (right padding), the same path every analysis uses.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import torch

from ..batching import encode, forward
from ..models import LoadedModel, from_module
from .corpus import (
    CONSTRUCTIONS,
    CORPUS_SEED,
    Prompt,
    heldout_filler,
    heldout_sva_prompts,
    heldout_twohop_prompts,
    world,
)

# A shipped model must reach these held-out accuracies.
THRESHOLDS = {"sva_simple": 0.99, "sva_pp": 0.99, "sva_rc": 0.99, "twohop": 0.95}
FILLER_TEXTS = 64
BATCH = 128


@contextmanager
def pinned_threads(count: int = 1):
    """Run torch on ``count`` intra-op threads, then restore the previous count.

    Zoo models are too small to gain from more threads (on a busy machine extra threads only
    contend), and float reductions, hence bit-exact results, depend on the count.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _subsample(items: list, sample: int | None, label: str) -> list:
    if sample is None or sample >= len(items):
        return items
    return random.Random(f"sample-{label}").sample(items, sample)


def _last_logits(model: LoadedModel, texts: list[str]) -> torch.Tensor:
    rows = []
    for start in range(0, len(texts), BATCH):
        batch = encode(model, texts[start : start + BATCH])
        logits = forward(model, batch)
        rows.append(logits[torch.arange(len(batch)), batch.lengths - 1])
    return torch.cat(rows)


def _token_ids(model: LoadedModel, words) -> torch.Tensor:
    return torch.tensor(model.tokenizer.convert_tokens_to_ids(list(words)))


def sva_accuracy(model: LoadedModel, prompts: list[Prompt]) -> float:
    logits = _last_logits(model, [p.text for p in prompts])
    rows = torch.arange(len(prompts))
    correct = logits[rows, _token_ids(model, (p.answer for p in prompts))]
    wrong = logits[rows, _token_ids(model, (p.wrong for p in prompts))]
    return float((correct > wrong).float().mean())


def twohop_accuracy(model: LoadedModel, prompts: list[Prompt], capitals) -> float:
    capitals = list(capitals)
    logits = _last_logits(model, [p.text for p in prompts])[:, _token_ids(model, capitals)]
    answers = torch.tensor([capitals.index(p.answer) for p in prompts])
    return float((logits.argmax(-1) == answers).float().mean())


def filler_scores(model: LoadedModel, texts: list[str]) -> tuple[float, float]:
    """(top-1 accuracy, cross-entropy in nats) of next-token prediction over every real token."""
    hits, loss, count = 0.0, 0.0, 0
    for start in range(0, len(texts), BATCH):
        batch = encode(model, texts[start : start + BATCH])
        logits = forward(model, batch)[:, :-1]
        targets = batch.input_ids[:, 1:]
        real = batch.attention_mask[:, 1:].bool()
        hits += float((logits.argmax(-1) == targets)[real].sum())
        loss += float(torch.nn.functional.cross_entropy(logits[real], targets[real], reduction="sum"))
        count += int(real.sum())
    return hits / count, loss / count


@torch.no_grad()
@pinned_threads()
def evaluate_model(model: LoadedModel, *, corpus_seed: int = CORPUS_SEED, sample: int | None = None) -> dict:
    """Card metrics; ``sample`` caps the prompts per set and the filler texts (a seeded subsample)."""
    metrics = {}
    for construction in CONSTRUCTIONS:
        prompts = _subsample(heldout_sva_prompts(construction, corpus_seed), sample, construction)
        metrics[f"sva_{construction}"] = sva_accuracy(model, prompts)
    prompts = _subsample(heldout_twohop_prompts(corpus_seed), sample, "twohop")
    metrics["twohop"] = twohop_accuracy(model, prompts, world(corpus_seed).capitals)
    texts = heldout_filler(min(sample or FILLER_TEXTS, FILLER_TEXTS), corpus_seed=corpus_seed)
    metrics["filler_top1"], metrics["filler_ce"] = filler_scores(model, texts)
    return {key: round(value, 4) for key, value in metrics.items()}


def evaluate_module(module, tokenizer, *, corpus_seed: int = CORPUS_SEED, sample: int | None = None) -> dict:
    return evaluate_model(from_module(module, tokenizer), corpus_seed=corpus_seed, sample=sample)


def meets_thresholds(metrics: dict) -> bool:
    return all(metrics[key] >= minimum for key, minimum in THRESHOLDS.items())
