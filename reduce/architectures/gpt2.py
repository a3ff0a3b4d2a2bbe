from . import Architecture

ARCHITECTURE = Architecture(
    family="gpt2",
    model_types=("gpt2",),
    layers="h",
    mlp_out="mlp.c_proj",
    attn_out="attn.c_proj",
    final_norm="ln_f",
)
