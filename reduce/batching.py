"""Token batches with right padding, so a padded batch computes exactly what one-prompt runs do.

Causal models never attend forward, and encoders mask padded keys, so with right padding every
real token sees the same context as in a one-prompt run and keeps its position ids; padded
positions are marked in ``attention_mask`` and dropped everywhere downstream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hooks import ForwardStopped


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, pos)
    attention_mask: torch.Tensor  # (batch, pos), 1 = real token
    lengths: torch.Tensor  # (batch,)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.lengths.to(device))

    def repeat(self, times: int) -> "Batch":
        """The batch stacked ``times`` times (ablation settings share one forward this way)."""
        return Batch(self.input_ids.repeat(times, 1), self.attention_mask.repeat(times, 1), self.lengths.repeat(times))

    def select(self, rows) -> "Batch":
        return Batch(self.input_ids[rows], self.attention_mask[rows], self.lengths[rows])


def prepare_tokenizer(tokenizer):
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        # Padded positions are masked out, so any id serves; eos is what GPT-2 users expect.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def encode(model, texts, *, width: int | None = None) -> Batch:
    """Tokenize ``texts`` right-padded to the longest (or to ``width``)."""
    tokenizer = prepare_tokenizer(model.tokenizer)
    padding = "max_length" if width else True
    encoded = tokenizer(list(texts), padding=padding, max_length=width, truncation=bool(width), return_tensors="pt")
    mask = encoded["attention_mask"]
    return Batch(encoded["input_ids"], mask, mask.sum(1))


def token_strings(model, batch: Batch) -> list[list[str]]:
    tokenizer = model.tokenizer
    return [
        [tok if keep else "" for tok, keep in zip(tokenizer.convert_ids_to_tokens(row.tolist()), mask.tolist())]
        for row, mask in zip(batch.input_ids, batch.attention_mask)
    ]


def forward(model, batch: Batch):
    """One forward pass; returns logits (batch, pos, vocab) or, without an LM head, hidden states
    (None when hooks stopped it once their sites were recorded: ``hooked(stop_after_record=True)``)."""
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if model.causal:
        kwargs["use_cache"] = False
    try:
        output = model.module(**kwargs)
    except ForwardStopped:
        return None
    return output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state
