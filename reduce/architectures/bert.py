from . import Architecture

# Post-LayerNorm encoders: there is no final norm; token lags are signed (bidirectional).
ARCHITECTURE = Architecture(
    family="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert"),
    layers="encoder.layer",
    mlp_out="output.dense",
    attn_out="attention.output.dense",
    final_norm=None,
    causal=False,
)
