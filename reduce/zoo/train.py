"""Train a zoo model from its spec: one loop for every family, the family only picks a config.

A zoo model is an ordinary HuggingFace folder (``config.json``, ``model.safetensors``, a
word-level ``tokenizer.json`` with its config) plus ``card.json`` recording how it was made
and its held-out metrics. Training is deterministic given the spec's seed on one machine: the
weights are initialised from that seed, the data stream is drawn from it, there is no dropout,
and training runs on one pinned intra-op thread.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..progress import progress_bar
from ..store import atomic_path
from .corpus import SEQ_LEN, training_texts, vocabulary
from .evaluate import THRESHOLDS, evaluate_module, meets_thresholds, pinned_threads
from .specs import ZooSpec, spec_for

WEIGHTS_DIR = Path(__file__).parent / "weights"
PAD, BOS, UNK = "[PAD]", "[BOS]", "[UNK]"
TRAIN_THREADS = 1  # float reductions depend on the thread count; one thread reproduces anywhere

# Per family: the transformers config class, which config keys take which spec field, and fixed
# settings. Dropout is off everywhere: the data is clean and plentiful, and it keeps training a
# deterministic function of the seed.
FAMILIES = {
    "gpt2": (
        "GPT2Config",
        {"n_layer": "layers", "n_embd": "d_model", "n_head": "heads", "n_inner": "d_mlp", "n_positions": "seq_len"},
        {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    ),
    "llama": (
        "LlamaConfig",
        {
            "num_hidden_layers": "layers",
            "hidden_size": "d_model",
            "num_attention_heads": "heads",
            "num_key_value_heads": "heads",
            "intermediate_size": "d_mlp",
            "max_position_embeddings": "seq_len",
        },
        {"attention_dropout": 0.0, "tie_word_embeddings": True},
    ),
    "gpt_neox": (
        "GPTNeoXConfig",
        {
            "num_hidden_layers": "layers",
            "hidden_size": "d_model",
            "num_attention_heads": "heads",
            "intermediate_size": "d_mlp",
            "max_position_embeddings": "seq_len",
        },
        {"attention_dropout": 0.0, "hidden_dropout": 0.0, "tie_word_embeddings": True},
    ),
}


def build_tokenizer(corpus_seed: int, max_length: int = SEQ_LEN):
    """A word-level tokenizer over the corpus vocabulary that prepends BOS to every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [PAD, BOS, UNK, *vocabulary(corpus_seed)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, words.index(BOS))]
    )
    # BOS doubles as EOS, as GPT-2's <|endoftext|> does: the corpus has no document ends.
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=BOS, pad_token=PAD, unk_token=UNK, model_max_length=max_length
    )


def model_config(spec: ZooSpec, tokenizer):
    import transformers

    class_name, mapping, fixed = FAMILIES[spec.family]
    values = {key: getattr(spec, field) for key, field in mapping.items()}
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return getattr(transformers, class_name)(**values, **fixed, **special)


def _learning_rate(spec: ZooSpec, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _batches(spec: ZooSpec, tokenizer):
    texts = training_texts(spec.seed, words=spec.seq_len - 1, corpus_seed=spec.corpus_seed)
    while True:
        chunk = [next(texts) for _ in range(spec.batch)]
        encoded = tokenizer(chunk, truncation=True, max_length=spec.seq_len, return_tensors="pt")
        yield encoded["input_ids"]


def train_module(spec: ZooSpec, tokenizer, *, progress: bool = True):
    """(trained module, final training loss): the loop shared by every family."""
    import transformers

    torch.manual_seed(spec.seed)
    module = transformers.AutoModelForCausalLM.from_config(model_config(spec, tokenizer))
    module.train()
    # Weight decay on matrices only, not on norms and biases.
    decay = [p for p in module.parameters() if p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )
    batches = _batches(spec, tokenizer)
    bar = progress_bar(range(spec.steps), desc=f"train {spec.family} d{spec.d_model}", enabled=progress)
    smoothed = None
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(spec, step)
        input_ids = next(batches)
        logits = module(input_ids=input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.3f}", refresh=False)
    module.eval()
    return module, smoothed


def train(name: str, *, out_dir=None, progress: bool = True) -> Path:
    """Train zoo model ``name`` from :data:`ZOO_SPECS`, evaluate it, and save folder + card.

    ``out_dir`` defaults to the package's ``weights/NAME``; the folder is replaced atomically.
    """
    spec = spec_for(name)
    out = Path(out_dir) if out_dir is not None else WEIGHTS_DIR / name
    tokenizer = build_tokenizer(spec.corpus_seed, spec.seq_len)
    started = time.perf_counter()
    with pinned_threads(TRAIN_THREADS):
        module, final_loss = train_module(spec, tokenizer, progress=progress)
    wall = time.perf_counter() - started
    metrics = evaluate_module(module, tokenizer, corpus_seed=spec.corpus_seed)
    card = {
        "name": name,
        "spec": asdict(spec),
        "config": module.config.to_diff_dict(),
        "parameters": sum(p.numel() for p in module.parameters()),
        "seed": spec.seed,
        "corpus_seed": spec.corpus_seed,
        "training_steps": spec.steps,
        "training_tokens": spec.steps * spec.batch * spec.seq_len,
        "final_training_loss_ema": round(final_loss, 4),
        "wall_time_s": round(wall, 1),
        "trained_on": f"{platform.system()} {platform.machine()}, {TRAIN_THREADS} torch thread(s)",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "metrics": metrics,
        "metric_definitions": METRIC_DEFINITIONS,
        "thresholds": THRESHOLDS,
        "meets_thresholds": meets_thresholds(metrics),
    }
    with atomic_path(out) as folder:
        module.save_pretrained(folder, safe_serialization=True)
        # A fresh copy: the one used above keeps the padding and truncation of its last call.
        build_tokenizer(spec.corpus_seed, spec.seq_len).save_pretrained(folder)
        (folder / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return out


METRIC_DEFINITIONS = {
    "sva_simple / sva_pp / sva_rc": "held-out prompts: fraction with logit(correct verb) > logit(wrong verb) at the last position",
    "twohop": "held-out cities: fraction whose correct capital has the largest logit among all capitals at the last position",
    "filler_top1 / filler_ce": "held-out filler text: next-token top-1 accuracy and cross-entropy (nats) over every predicted token",
}
