"""Tiny randomly initialised models of every supported family (no download)."""

import torch
import transformers as T

from reduce.models import from_module

CONFIGS = {
    "gpt2": lambda: T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: T.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100, bos_token_id=0, eos_token_id=0),
    "llama": lambda: T.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=100, bos_token_id=0, eos_token_id=0),
    "opt": lambda: T.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64, vocab_size=100, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=1),
    "bert": lambda: T.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100),
    "roberta": lambda: T.RobertaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100, pad_token_id=1),
    "vit": lambda: T.ViTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4),
}

# The MLP's input projection(s) and nonlinearity, to recompute neurons by hand in tests.
MLP_BY_HAND = {
    "gpt2": (("mlp.c_fc",), lambda fc: T.activations.NewGELUActivation()(fc)),
    "gpt_neox": (("mlp.dense_h_to_4h",), lambda fc: torch.nn.functional.gelu(fc)),
    "llama": (("mlp.gate_proj", "mlp.up_proj"), lambda gate, up: torch.nn.functional.silu(gate) * up),
    "opt": (("fc1",), lambda fc: torch.relu(fc)),
    "bert": (("intermediate.dense",), lambda fc: torch.nn.functional.gelu(fc)),
    "roberta": (("intermediate.dense",), lambda fc: torch.nn.functional.gelu(fc)),
    "vit": (("mlp.fc1",), lambda fc: torch.nn.functional.gelu(fc)),
}


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    if family in ("bert", "roberta"):
        module = T.AutoModelForMaskedLM.from_config(config)
    elif family == "vit":
        module = T.ViTForImageClassification(config)
    else:
        module = T.AutoModelForCausalLM.from_config(config)
    return from_module(module, name=f"tiny-{family}")


def tiny_inputs(model, batch: int = 3, length: int = 7, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if model.arch.inputs == "pixels":
        size = model.config.image_size
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}
    ids = torch.randint(2, 100, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# A word-level vocabulary small enough for the tiny configs (vocab_size=100). Ids 0 and 1 are the
# end-of-text and padding tokens the configs name (RoBERTa and OPT compute positions from pad id 1).
TINY_WORDS = (
    ["[EOS]", "[PAD]", "[UNK]", "[MASK]", "."]
    + "the a key keys cabinet cabinets table tables dog dogs cat cats box boxes man men near on by of with".split()
    + "is are was were sits sit runs run red big old new small and".split()
)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(TINY_WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]", mask_token="[MASK]")


def tiny_text_model(family: str, seed: int = 0):
    """A tiny model of a token family with the word-level tokenizer, in memory."""
    return from_module(tiny_model(family, seed).module, tokenizer=tiny_tokenizer(), name=f"tiny-{family}")


def tiny_folder(family: str, folder, seed: int = 0):
    """Save a tiny model of ``family`` with a word-level tokenizer, loadable by ``load_model(folder)``."""
    model = tiny_model(family, seed)
    model.module.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
