"""The models and prompt batches every recording benchmark runs on.

Three models, each with the batches one benchmark run feeds it:

- ``minilm``: the bundled all-MiniLM-L6-v2 (BERT encoder, 6 layers, d_model 384) on the prompts of
  ``conditions/minilm_neuron.toml``, batched exactly as ``reduce.record`` batches them;
- ``zoo:gpt2-d128-s0``: the zoo default (GPT-2, 4 layers, d_model 128; random weights of the
  same configuration if the zoo is not trained) on ``conditions/sva.toml``'s prompts;
- ``gpt2-small-random``: GPT-2 small (``GPT2Config()`` defaults: 12 layers, d_model 768, 124M
  parameters), randomly initialised, fed random token ids in right-padded batches of varied
  lengths (no tokenizer needed: ids go straight into a :class:`reduce.batching.Batch`).

The unit sites are every MLP neuron and every attention pre-out unit
(``blocks.*.mlp.hook_post``, ``blocks.*.attn.hook_z``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from reduce.batching import Batch
from reduce.errors import ReduceError
from reduce.sites import Site, resolve_sites
from reduce.target import Target

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ROOT / "conditions"
ZOO_DEFAULT = "gpt2-d128-s0"
UNIT_SITE_PATTERNS = ("blocks.*.mlp.hook_post", "blocks.*.attn.hook_z")
MODEL_KEYS = ("minilm", f"zoo:{ZOO_DEFAULT}", "gpt2-small-random")


@dataclass
class Workload:
    """A model with the batches a benchmark feeds it. ``condition``: the condition the batches come
    from (None for random token ids); ``tokenizer``: what peers that insist on one are given."""

    key: str
    model: object  # reduce.models.LoadedModel
    batches: list[Batch]
    prompt_source: str
    condition: object = None
    tokenizer: object = None

    @cached_property
    def sites(self) -> list[Site]:
        return resolve_sites(list(UNIT_SITE_PATTERNS), self.model.n_layers)

    @cached_property
    def target(self) -> Target:
        """A neuron target (the last layer's first MLP neuron): what ``record`` computes besides the sites."""
        return Target("neuron", site=Site.parse(f"blocks.{self.model.n_layers - 1}.mlp.hook_post"), unit=0, position="last")

    @property
    def prompts(self) -> int:
        return sum(len(batch) for batch in self.batches)

    @property
    def tokens(self) -> int:
        return int(sum(int(batch.lengths.sum()) for batch in self.batches))

    @property
    def units(self) -> int:
        return sum(self.model.n_units(site) for site in self.sites)

    def describe(self) -> dict:
        model = self.model
        return {
            "model": self.key,
            "architecture": f"{model.arch.family}: {model.n_layers} layers, d_model {model.d_model}, {model.d_mlp} MLP neurons, {model.n_heads} heads x {model.d_head}",
            "parameters": sum(p.numel() for p in model.module.parameters()),
            "prompts": self.prompts,
            "prompt_source": self.prompt_source,
            "batch_size": max(len(batch) for batch in self.batches),
            "batches": len(self.batches),
            "sequence_length_max": max(batch.width for batch in self.batches),
            "sequence_length_mean": round(self.tokens / self.prompts, 2),
            "tokens": self.tokens,
            "sites": len(self.sites),
            "units": self.units,
            "threads": torch.get_num_threads(),
        }


def load_zoo_default():
    """The zoo default model, or its architecture with random weights before the zoo is trained."""
    from reduce.models import from_module, load_model

    try:
        return load_model(f"zoo:{ZOO_DEFAULT}"), f"zoo:{ZOO_DEFAULT}"
    except ReduceError:
        import transformers

        from reduce.zoo.specs import ZOO_SPECS
        from reduce.zoo.train import build_tokenizer, model_config

        spec = ZOO_SPECS[ZOO_DEFAULT]
        tokenizer = build_tokenizer(spec.corpus_seed)
        torch.manual_seed(spec.seed)
        module = transformers.GPT2LMHeadModel(model_config(spec, tokenizer))
        return from_module(module, tokenizer, name=f"random-init {ZOO_DEFAULT}"), f"random-init {ZOO_DEFAULT}"


def condition_workload(key: str, condition_file: str, model, *, prompts: int, batch_size: int) -> Workload:
    """The condition's first ``prompts`` prompts (its own seeded sample), cut as ``reduce.record`` cuts them."""
    from reduce.condition import load_condition, resolve
    from reduce.record import Recording

    condition = load_condition(CONDITIONS / condition_file)
    condition = dataclasses.replace(
        condition,
        prompts=dataclasses.replace(condition.prompts, max_prompts=prompts),
        record=dataclasses.replace(condition.record, batch_size=batch_size),
    )
    recording = Recording(resolve(condition, model))
    batches = [recording.batch(index) for index in range(len(recording))]
    return Workload(key, model, batches, f"conditions/{condition_file}", condition, model.tokenizer)


def minilm_workload(*, prompts: int, batch_size: int = 32) -> Workload:
    from reduce.models import load_model

    return condition_workload("minilm", "minilm_neuron.toml", load_model("minilm"), prompts=prompts, batch_size=batch_size)


def zoo_workload(*, prompts: int, batch_size: int = 64, model=None) -> Workload:
    model = model if model is not None else load_zoo_default()[0]
    return condition_workload(f"zoo:{ZOO_DEFAULT}", "sva.toml", model, prompts=prompts, batch_size=batch_size)


def random_token_batches(vocab_size: int, *, prompts: int, batch_size: int, max_length: int, seed: int = 0) -> list[Batch]:
    """Right-padded batches of random ids, lengths uniform in [max_length / 2, max_length], each
    batch as wide as its longest prompt (as ``reduce.record`` trims them)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, prompts, batch_size):
        rows = min(batch_size, prompts - start)
        lengths = torch.randint(max_length // 2, max_length + 1, (rows,), generator=generator)
        width = int(lengths.max())
        ids = torch.randint(0, vocab_size, (rows, width), generator=generator)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        batches.append(Batch(ids * mask, mask, lengths))
    return batches


def gpt2_small_workload(*, prompts: int, batch_size: int, max_length: int, stand_in_tokenizer=None) -> Workload:
    """Randomly initialised GPT-2 small (124M) on random token ids. Peers that refuse to wrap a model
    without a tokenizer get ``stand_in_tokenizer``; it never encodes anything here."""
    import transformers

    from reduce.models import from_module

    torch.manual_seed(0)
    module = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    model = from_module(module, name="gpt2-small-random")
    batches = random_token_batches(module.config.vocab_size, prompts=prompts, batch_size=batch_size, max_length=max_length)
    return Workload("gpt2-small-random", model, batches, f"random token ids, {max_length // 2}-{max_length} tokens", None, stand_in_tokenizer)
