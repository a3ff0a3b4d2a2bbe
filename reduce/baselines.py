"""What an ablated unit is set to: one enumerable :class:`Baseline` type, one offset contract.

Every baseline becomes *offsets* per site, applied by :mod:`reduce.hooks` with the one formula
``x * mask + offset * (1 - mask)``:

==========================  ==============================================  ===================
baseline                    offset                                          shape per site
==========================  ==============================================  ===================
``zero``                    0                                               ``(units,)``
``mean``                    mean over the condition's reference set         ``(units,)``
``peak``                    refined mode of the streaming histogram          ``(units,)``
``peak_naive``              centre of the fullest histogram bin (seed       ``(units,)``
                            004's "naive peak ablation")
``resample_characters``     activation on random characters (RS1)           ``(batch, pos, units)``
``resample_tokens``         activation on random token ids (RS2)            ``(batch, pos, units)``
``resample_generated``      activation on text sampled from the model (RS3) ``(batch, pos, units)``
``resample_counterfactual`` activation on the prompt's counterfactual, at   ``(batch, pos, units)``
                            the same position (symmetric token replacement)
==========================  ==============================================  ===================

Resampled offsets come from one forward of the *source* batch (same width as the prompts, each
row at least as long as its prompt) recording the unit sites. Random sources are seeded per row
from ``(seed, stream, key)``, so a prompt gets the same source whatever batch it sits in.

The unit table (dimension ``unit``; coordinates ``site``, ``layer``, ``kind``, ``index``) is
how per-unit quantities (statistics, masks, attributions) map onto the site tensors:
:class:`UnitTable`.
"""

from __future__ import annotations

import enum
import string
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import xarray as xr

from .batching import Batch, encode, forward
from .errors import ReduceError
from .hooks import hooked
from .sites import Site


class Baseline(str, enum.Enum):
    ZERO = "zero"
    MEAN = "mean"
    PEAK = "peak"
    PEAK_NAIVE = "peak_naive"
    RESAMPLE_CHARACTERS = "resample_characters"
    RESAMPLE_TOKENS = "resample_tokens"
    RESAMPLE_GENERATED = "resample_generated"
    RESAMPLE_COUNTERFACTUAL = "resample_counterfactual"

    @property
    def is_resample(self) -> bool:
        return self.value.startswith("resample_")

    @property
    def label(self) -> str:
        """The name seed 004's Table 2 uses (RS1-RS3: random characters, tokens, generated text)."""
        return _LABELS[self]

    @classmethod
    def parse(cls, name, *, source=None, field="ablate.baselines") -> "Baseline":
        try:
            return cls(name)
        except ValueError:
            raise ReduceError(f"unknown baseline {name!r}; expected one of {', '.join(b.value for b in cls)}", file=source, field=field) from None


_LABELS = {
    Baseline.ZERO: "Zero",
    Baseline.MEAN: "Mean",
    Baseline.PEAK_NAIVE: "Peak",
    Baseline.PEAK: "Peak (refined)",
    Baseline.RESAMPLE_CHARACTERS: "RS1",
    Baseline.RESAMPLE_TOKENS: "RS2",
    Baseline.RESAMPLE_GENERATED: "RS3",
    Baseline.RESAMPLE_COUNTERFACTUAL: "RS counterfactual",
}



@dataclass(frozen=True)
class UnitTable:
    """Rows of the unit table and where each lives: ``site`` name, ``layer``, ``kind``, flat ``index``."""

    site: np.ndarray
    layer: np.ndarray
    kind: np.ndarray
    index: np.ndarray

    @classmethod
    def from_dataset(cls, table: xr.Dataset | xr.DataArray, *, source=None) -> "UnitTable":
        missing = [c for c in ("site", "layer", "kind", "index") if c not in table.coords and c not in getattr(table, "data_vars", {})]
        if missing or "unit" not in table.dims:
            raise ReduceError(f"the unit table needs dimension 'unit' with coordinates site, layer, kind, index (missing: {', '.join(missing) or 'unit'})", file=source, field="unit")
        return cls(*(np.asarray(table[c].values) for c in ("site", "layer", "kind", "index")))

    @classmethod
    def for_sites(cls, model, sites) -> "UnitTable":
        """Every unit of the given unit sites, site by site in the given order."""
        sites = [s for s in sites if s.is_unit_site]
        sizes = [model.n_units(s) for s in sites]
        return cls(
            np.repeat([s.name for s in sites], sizes).astype(object),
            np.repeat([s.layer for s in sites], sizes),
            np.repeat([s.kind for s in sites], sizes).astype(object),
            np.concatenate([np.arange(n) for n in sizes]) if sites else np.zeros(0, int),
        )

    def __len__(self) -> int:
        return len(self.site)

    def coords(self) -> dict:
        return {name: ("unit", getattr(self, name)) for name in ("site", "layer", "kind", "index")}

    @cached_property
    def sites(self) -> list[Site]:
        names = dict.fromkeys(self.site.tolist())
        return [Site.parse(name) for name in names]

    @cached_property
    def _rows(self) -> dict[str, np.ndarray]:
        return {site.name: np.flatnonzero(self.site == site.name) for site in self.sites}

    def rows(self, site: Site) -> np.ndarray:
        """Table rows of ``site``'s units."""
        return self._rows[site.name]

    def scatter(self, values: np.ndarray, site: Site, size: int, fill=0) -> np.ndarray:
        """Per-unit ``values`` over the table (last axis) laid out over the site's ``size`` units."""
        values = np.asarray(values)
        out = np.full((*values.shape[:-1], size), fill, dtype=values.dtype)
        rows = self.rows(site)
        out[..., self.index[rows]] = values[..., rows]
        return out

    def gather(self, site_values: torch.Tensor, site: Site) -> torch.Tensor:
        """``(..., site units)`` -> ``(..., rows of this site)``, in table order."""
        return site_values[..., torch.as_tensor(self.index[self.rows(site)], device=site_values.device)]


class BaselineSource:
    """Offsets of every baseline for any batch: ``offsets(baseline, batch, keys) -> {site: tensor}``.

    ``stats``: ``stats.nc`` (or any dataset over the unit table with variables ``mean``, ``peak``,
    ``peak_naive``; only needed for those baselines). ``counterfactual_texts``: the paired counterfactual prompt of
    each prompt, indexed by prompt key (only needed for ``resample_counterfactual``).
    """

    def __init__(self, model, units: UnitTable, stats: xr.Dataset | None = None, *, seed: int = 0, counterfactual_texts=None):
        self.model = model
        self.units = units
        self.stats = stats
        self.seed = seed
        self.counterfactual_texts = counterfactual_texts

    def supports(self, baseline: Baseline, stream: str) -> bool:
        """Counterfactual partners exist only for the condition's prompts (stream ``"prompts"``)."""
        return baseline is not Baseline.RESAMPLE_COUNTERFACTUAL or (stream == "prompts" and self.counterfactual_texts is not None)

    def offsets(self, baseline: Baseline, batch: Batch, keys, *, stream: str = "prompts") -> dict[str, torch.Tensor]:
        """``{site name: offset}`` for every unit site of the table; ``keys`` name the batch's rows."""
        baseline = Baseline(baseline)
        if not baseline.is_resample:
            return {site.name: torch.as_tensor(self._constant(baseline, site), device=self.model.device) for site in self.units.sites}
        source = self.source_batch(baseline, batch, keys, stream=stream)
        return record_sites(self.model, source, self.units.sites)

    def _constant(self, baseline: Baseline, site: Site) -> np.ndarray:
        size = self.model.n_units(site)
        if baseline is Baseline.ZERO:
            return np.zeros(size, dtype=np.float32)
        variable = baseline.value  # stats.nc names its per-unit variables as the constant baselines
        if self.stats is None or variable not in self.stats:
            raise ReduceError(f"{baseline.value} ablation needs the statistic {variable!r} over the unit table; run `reduce record` first", file="stats.nc", field=variable)
        return self.units.scatter(self.stats[variable].values.astype(np.float32), site, size)

    def source_batch(self, baseline: Baseline, batch: Batch, keys, *, stream: str = "prompts") -> Batch:
        """The batch whose activations replace ``batch``'s: same width, every row at least as long."""
        keys = [int(k) for k in keys]
        if len(keys) != len(batch):
            raise ValueError(f"{len(keys)} keys for a batch of {len(batch)}")
        if baseline is Baseline.RESAMPLE_COUNTERFACTUAL:
            return self._counterfactual(batch, keys, stream)
        generators = [torch.Generator().manual_seed(_row_seed(self.seed, stream, baseline, key)) for key in keys]
        if baseline is Baseline.RESAMPLE_TOKENS:
            return self._random_tokens(batch, generators)
        if baseline is Baseline.RESAMPLE_CHARACTERS:
            return self._random_characters(batch, generators)
        return self._generated(batch, generators)

    def _counterfactual(self, batch: Batch, keys, stream: str) -> Batch:
        if not self.supports(Baseline.RESAMPLE_COUNTERFACTUAL, stream):
            raise ReduceError("counterfactual resampling needs the condition's paired counterfactual prompts", field="prompts.counterfactual")
        texts = [self.counterfactual_texts[k] for k in keys]
        source = encode(self.model, texts)
        different = torch.nonzero(source.lengths != batch.lengths).flatten().tolist()
        if different:
            key = keys[different[0]]
            raise ReduceError(
                f"prompt {key}'s counterfactual has {int(source.lengths[different[0]])} tokens but the prompt has {int(batch.lengths[different[0]])}; "
                "counterfactual resampling needs position-aligned pairs (symmetric token replacement)",
                field="prompts.counterfactual",
            )
        return encode(self.model, texts, width=batch.width).to(batch.input_ids.device)

    def _random_tokens(self, batch: Batch, generators) -> Batch:
        """Uniform ids over the vocabulary, keeping the prompt's special tokens (BOS/CLS/SEP) in place."""
        special = torch.tensor(_special_ids(self.model), dtype=torch.long)
        ids = torch.stack([torch.randint(0, _vocab_size(self.model), (batch.width,), generator=g) for g in generators]).to(batch.input_ids.device)
        keep = torch.isin(batch.input_ids, special.to(batch.input_ids.device))
        while True:  # redraw ordinary positions that drew a special id
            redraw = torch.isin(ids, special.to(ids.device)) & ~keep
            if not redraw.any():
                break
            for row in redraw.any(1).nonzero().flatten().tolist():
                fresh = torch.randint(0, _vocab_size(self.model), (batch.width,), generator=generators[row]).to(ids.device)
                ids[row] = torch.where(redraw[row], fresh, ids[row])
        return Batch(torch.where(keep, batch.input_ids, ids), batch.attention_mask.clone(), batch.lengths.clone())

    def _random_characters(self, batch: Batch, generators) -> Batch:
        """Random printable characters, tokenised and cut to the batch width; lengthened until each row covers its prompt."""
        if self.model.tokenizer is None:
            raise ReduceError("random-character resampling needs the model's tokenizer", field="model.name")
        alphabet = np.array(list(string.ascii_letters + string.digits + string.punctuation + " "))
        n_chars = 4 * batch.width
        while True:
            texts = ["".join(alphabet[torch.randint(0, len(alphabet), (n_chars,), generator=g).numpy()]) for g in generators]
            source = encode(self.model, texts, width=batch.width)
            if bool((source.lengths >= batch.lengths.cpu()).all()):
                return source.to(batch.input_ids.device)
            n_chars *= 2

    @torch.no_grad()
    def _generated(self, batch: Batch, generators) -> Batch:
        """Text sampled from the model (temperature 1) from its BOS token, one full-width row per prompt."""
        if not self.model.causal or self.model.unembed is None:
            raise ReduceError("generated-text resampling needs a causal language model", field="ablate.baselines")
        device = batch.input_ids.device
        bos = getattr(self.model.tokenizer, "bos_token_id", None) if self.model.tokenizer is not None else None
        ids = batch.input_ids[:, :1].clone() if bos is None else torch.full((len(batch), 1), bos, device=device)
        while ids.shape[1] < batch.width:
            step = Batch(ids, torch.ones_like(ids), torch.full((len(ids),), ids.shape[1], device=device))
            probs = torch.softmax(forward(self.model, step)[:, -1].float(), -1).cpu()
            drawn = torch.stack([torch.multinomial(probs[row], 1, generator=g) for row, g in enumerate(generators)])
            ids = torch.cat([ids, drawn.to(device)], 1)
        return Batch(ids, torch.ones_like(ids), torch.full((len(ids),), batch.width, device=device))


@torch.no_grad()
def record_sites(model, batch: Batch, sites) -> dict[str, torch.Tensor]:
    """``{site name: (batch, pos, units)}`` of one plain forward."""
    with hooked(model, record=sites, stop_after_record=True) as recorded:
        forward(model, batch)
    return dict(recorded)


def _row_seed(seed: int, stream: str, baseline: Baseline, key: int) -> int:
    entropy = [seed, zlib.crc32(stream.encode()), zlib.crc32(baseline.value.encode()), key % 2**32]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _vocab_size(model) -> int:
    embedded = int(model.config.vocab_size)
    return min(len(model.tokenizer), embedded) if model.tokenizer is not None else embedded


def _special_ids(model) -> list[int]:
    if model.tokenizer is not None:
        return sorted(set(model.tokenizer.all_special_ids))
    config = model.config
    return sorted({i for i in (config.bos_token_id, config.eos_token_id, getattr(config, "pad_token_id", None)) if i is not None})
