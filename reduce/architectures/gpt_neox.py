from . import Architecture

ARCHITECTURE = Architecture(
    family="gpt_neox",
    model_types=("gpt_neox",),
    layers="layers",
    mlp_out="mlp.dense_4h_to_h",
    attn_out="attention.dense",
    final_norm="final_layer_norm",
)
