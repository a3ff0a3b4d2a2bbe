"""The quantity a reduced model predicts: a neuron, a logit, or a logit difference.

Every target is computed at every position, shape ``(batch, pos)``: the value at the target
position is what is predicted, the values at earlier positions are its history (the
post-spike term of the seed's model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sites import Site

KINDS = ("neuron", "logit", "logit_diff")


@dataclass(frozen=True)
class Target:
    kind: str
    site: Site | None = None  # neuron targets
    unit: int | None = None  # neuron targets: flat unit index within the site
    position: str | int = "last"  # "last", "all", or a token index (negative counts from the end)

    @property
    def sites(self) -> list[Site]:
        return [self.site] if self.kind == "neuron" else []

    @property
    def reads_output(self) -> bool:
        """Whether the target needs the model's output (logits), not only recorded sites."""
        return self.kind != "neuron"

    @property
    def name(self) -> str:
        if self.kind == "neuron":
            return f"{self.site.name}[{self.unit}]"
        return self.kind

    def values(self, output: torch.Tensor, recorded: dict, answer_ids=None, wrong_ids=None) -> torch.Tensor:
        """(batch, pos) target values from a forward's output and recorded sites.

        ``answer_ids`` / ``wrong_ids``: (batch,) token ids of each prompt's correct and wrong answer.
        """
        if self.kind == "neuron":
            return recorded[self.site.name][..., self.unit]
        answer = _per_position(output, answer_ids)
        return answer if self.kind == "logit" else answer - _per_position(output, wrong_ids)

    def position_mask(self, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """(batch, pos) bool: where the target is evaluated."""
        positions = torch.arange(width, device=lengths.device)[None, :]
        real = positions < lengths[:, None]
        if self.position == "all":
            return real
        if self.position == "last":
            index = lengths - 1
        else:
            index = torch.where(torch.tensor(self.position < 0), lengths + self.position, torch.full_like(lengths, self.position))
        return positions == index[:, None]


def _per_position(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    index = token_ids.to(logits.device)[:, None, None].expand(-1, logits.shape[1], 1)
    return logits.gather(-1, index)[..., 0]
