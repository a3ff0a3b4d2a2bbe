"""What each zoo model is: its family, shape and training recipe, as data."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ReduceError
from .corpus import CORPUS_SEED, SEQ_LEN


@dataclass(frozen=True)
class ZooSpec:
    family: str  # a key of reduce.zoo.train.FAMILIES
    layers: int
    d_model: int
    heads: int
    d_mlp: int
    seed: int
    steps: int
    lr: float = 3e-3
    batch: int = 32
    seq_len: int = SEQ_LEN  # tokens per training sequence, BOS included; also the position limit
    warmup: int = 100
    weight_decay: float = 0.1
    corpus_seed: int = CORPUS_SEED
    about: str = ""


def _default(seed: int, **changes) -> ZooSpec:
    shape = {"family": "gpt2", "layers": 4, "d_model": 128, "heads": 4, "d_mlp": 512, "seed": seed, "steps": 1200}
    return ZooSpec(**{**shape, **changes})


ZOO_SPECS: dict[str, ZooSpec] = {
    **{f"gpt2-d128-s{seed}": _default(seed, about="default model (GPT-2 style)") for seed in range(5)},
    "gpt2-d64-s0": _default(0, d_model=64, heads=4, d_mlp=256, about="narrower default"),
    "gpt2-d192-s0": _default(0, d_model=192, heads=6, d_mlp=768, about="wider default"),
    # 344 gated units hold as many MLP weights as GPT-2's 512 ungated ones.
    "llama-d128-s0": _default(0, family="llama", d_mlp=344, about="gated MLP, RMSNorm, rotary positions"),
    "neox-d128-s0": _default(0, family="gpt_neox", about="parallel attention and MLP, rotary positions"),
    "tiny": ZooSpec("gpt2", layers=2, d_model=32, heads=2, d_mlp=128, seed=0, steps=700, lr=1e-2, warmup=30, about="for tests"),
}


def spec_for(name: str, *, source=None, field: str | None = None) -> ZooSpec:
    if name not in ZOO_SPECS:
        raise ReduceError(f"unknown zoo model {name!r}; known: {', '.join(ZOO_SPECS)}", file=source, field=field)
    return ZOO_SPECS[name]
