from . import Architecture

ARCHITECTURE = Architecture(
    family="opt",
    model_types=("opt",),
    layers="decoder.layers",
    mlp_out="fc2",
    attn_out="self_attn.out_proj",
    final_norm="decoder.final_layer_norm",
)
