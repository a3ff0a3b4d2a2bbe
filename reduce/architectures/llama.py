from . import Architecture

# Gated MLPs: the input of down_proj is act(gate) * up, so the MLP neuron is the product.
ARCHITECTURE = Architecture(
    family="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"),
    layers="layers",
    mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj",
    final_norm="norm",
)
