from . import Architecture

ARCHITECTURE = Architecture(
    family="vit",
    model_types=("vit",),
    layers="layers",
    mlp_out="mlp.fc2",
    attn_out="attention.o_proj",
    final_norm="layernorm",
    causal=False,
    inputs="pixels",
)
