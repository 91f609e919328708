"""Training and evaluation of the Stage 2 refiner: losses, metrics, discriminator, Trainer."""

from data_builders._leaves import model_leaf as _model_leaf

# Before any training module imports transformers (and with it bitsandbytes), without modeling_stage2's heavy __init__.
_model_leaf("_quiet").drop_known_messages()
