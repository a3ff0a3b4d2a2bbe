"""Architectures are data: where the layers, the two out-projections and the final norm live.

Each family is one small file defining an :class:`Architecture`. Paths are dotted module
paths: ``layers`` and ``final_norm`` relative to ``model.base_model``, ``mlp_out`` and
``attn_out`` relative to one layer. Every site (``blocks.{l}.mlp.hook_post`` = input of the
MLP out-projection, ``blocks.{l}.attn.hook_z`` = input of the attention out-projection)
hooks those modules, so supporting a new family is a few lines, never a code branch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ReduceError


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]
    layers: str
    mlp_out: str
    attn_out: str
    final_norm: str | None
    causal: bool = True
    inputs: str = "tokens"  # or "pixels"


def _families() -> list[Architecture]:
    from . import bert, gpt2, gpt_neox, llama, opt, vit

    return [m.ARCHITECTURE for m in (gpt2, gpt_neox, llama, opt, bert, vit)]


def architecture_for(model_type: str, *, source=None) -> Architecture:
    """The architecture whose ``model_types`` include a HuggingFace ``config.model_type``."""
    for arch in _families():
        if model_type in arch.model_types:
            return arch
    known = sorted(t for a in _families() for t in a.model_types)
    raise ReduceError(
        f"model type {model_type!r} has no architecture adapter (supported: {', '.join(known)}); "
        "add one file under reduce/architectures/",
        file=source,
        field="model.name",
    )


