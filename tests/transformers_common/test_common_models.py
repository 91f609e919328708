"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) against `PrithviEncoder` and
`Stage2RefinerModel`, with tiny configs.

Run by `make transformers-common-tests`, which downloads the installed transformers release's sdist, unpacks it and
sets `TRANSFORMERS_SDIST_DIR`; without that variable (e.g. under `make test`) the module is skipped. The sdist lacks a
few modules the common tests import: see _sdist_shims.py. Common tests that do not apply to an image-to-image model
without token embeddings are skipped below, each with its reason.
"""
from __future__ import annotations

import os
import sys
import unittest
from pathlib import Path

import pytest

SDIST_ENV = "TRANSFORMERS_SDIST_DIR"
if not os.environ.get(SDIST_ENV):
    pytest.skip(f"{SDIST_ENV} is not set: run `make transformers-common-tests` (needs PyPI for the transformers sdist)",
                allow_module_level=True)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sdist_shims import load_common_tests  # noqa: E402

from modeling_stage2 import PrithviConfig, PrithviEncoder, Stage2RefinerConfig, Stage2RefinerModel  # noqa: E402
from modeling_stage2.configuration_stage2 import BAND_NAMES  # noqa: E402

common, config_common = load_common_tests(os.environ[SDIST_ENV])
ModelTesterMixin = common.ModelTesterMixin
ConfigTester = config_common.ConfigTester
floats_tensor = common.floats_tensor

BATCH, IMAGE, PATCH, EMBED, HEADS, DEPTH = 2, 28, 14, 32, 4, 2
SEQ_LENGTH = 1 + (IMAGE // PATCH) ** 2  # CLS + patches

# Reasons shared by both models.
NO_TOKENS = "image model: no token embeddings, vocabulary or input_ids"
NO_INPUTS_EMBEDS = "no inputs_embeds argument: the input is an image (pixel_values / opt_v1)"
NOT_GENERATIVE = "not a generative / causal-LM / encoder-decoder model"
NO_MULTIMODAL = "not a multimodal model: no get_{text,audio,video,image}_features"
NO_ROPE = "no rotary position embeddings (fixed sin-cos table)"
NO_MOE = "not a mixture-of-experts model"
NO_ATTENTION_MASK = "no attention mask or padding: every image patch attends to every other"
NO_CHUNKING = "no feed-forward chunking (chunk_size_feed_forward is not used)"
NO_HEADS = "base model only: no task heads, labels or problem types"
NO_LOSS = ("base model without a loss (no labels argument): the training tests need `outputs.loss`; training with "
           "the project's losses and gradient checkpointing is covered by tests/test_training.py")


def skip(reason: str):
    """A test method that unittest reports as skipped with `reason` (replaces an inherited common test)."""

    @unittest.skip(reason)
    def skipped_test(self):
        pass

    return skipped_test


class _NotApplicable:
    """Skips the common tests that do not apply to either model (mixed in before ModelTesterMixin)."""

    test_resize_embeddings = False
    test_resize_position_embeddings = False
    test_torch_exportable = False  # the torch.export tests are not in the sdist (see _sdist_shims.py)
    is_encoder_decoder = False
    has_attentions = True

    test_resize_tokens_embeddings = skip(NO_TOKENS)
    test_resize_embeddings_untied = skip(NO_TOKENS)
    test_resize_embeddings_untied_no_reinit_on_post_init = skip(NO_TOKENS)
    test_resize_embeddings_untied_with_deepspeed = skip(NO_TOKENS)
    test_resize_embeddings_untied_with_deepspeed_multi_gpu = skip(NO_TOKENS)
    test_resize_tokens_embeddings_with_deepspeed = skip(NO_TOKENS)
    test_resize_tokens_embeddings_with_deepspeed_multi_gpu = skip(NO_TOKENS)
    test_resize_position_vector_embeddings = skip(NO_TOKENS)
    test_tied_weights_keys = skip(NO_TOKENS + "; no tied weights")
    test_inputs_embeds = skip(NO_INPUTS_EMBEDS)
    test_inputs_embeds_matches_input_ids = skip(NO_INPUTS_EMBEDS)
    test_causal_lm_loss_honors_shift_labels = skip(NOT_GENERATIVE)
    test_encoder_decoder_loss_no_double_shift = skip(NOT_GENERATIVE)
    test_bc_cache_name_forward = skip(NOT_GENERATIVE + " (no KV cache)")
    test_feed_forward_chunking = skip(NO_CHUNKING)
    test_problem_types = skip(NO_HEADS)
    test_sliding_window_mask = skip(NO_ATTENTION_MASK)
    test_eager_matches_batched_and_grouped_inference = skip(NO_MOE)
    test_moe_models_record_router_logits = skip(NO_MOE)
    test_output_router_logits_from_config = skip(NO_MOE)
    test_model_rope_scaling_frequencies = skip(NO_ROPE)
    test_model_rope_with_partial_rotation = skip(NO_ROPE)
    test_vision_axial_rope = skip(NO_ROPE)
    test_multimodal_outputs_are_returned = skip(NO_MULTIMODAL)
    test_training = skip(NO_LOSS)
    test_training_gradient_checkpointing = skip(NO_LOSS)
    test_training_gradient_checkpointing_use_reentrant_false = skip(NO_LOSS)
    test_training_gradient_checkpointing_use_reentrant_true = skip(NO_LOSS)

    def test_model_get_set_embeddings(self):
        """The common version expects an `nn.Embedding` of tokens; an image model's input layer (the patch embedding
        or the refiner's input fusion, `_input_embed_layer`) is a convolution. As transformers' ViT test does: the
        input layer is a module, and there is no output embedding or it is a linear layer."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            output = model.get_output_embeddings()
            self.assertTrue(output is None or isinstance(output, torch.nn.Linear))


for _name in dir(ModelTesterMixin):
    # Parameterized families (their expanded names carry a suffix) that do not apply.
    if _name.startswith(("test_get_text_features", "test_get_audio_features", "test_get_video_features",
                         "test_get_image_features")):
        setattr(_NotApplicable, _name, skip(NO_MULTIMODAL))
    elif _name.startswith("test_model_rope_scaling_from_config"):
        setattr(_NotApplicable, _name, skip(NO_ROPE))
    elif _name.startswith("test_eager_matches_batched_and_grouped_inference"):
        setattr(_NotApplicable, _name, skip(NO_MOE + " (grouped experts)"))


class PrithviEncoderModelTester:
    def __init__(self, parent, batch_size=BATCH, image_size=IMAGE, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = PATCH
        self.num_channels = len(BAND_NAMES)
        self.hidden_size = EMBED
        self.num_hidden_layers = DEPTH
        self.num_attention_heads = HEADS
        self.is_training = is_training
        self.seq_length = SEQ_LENGTH
        # `hidden_states` has one entry per block (the last after the final LayerNorm), not embeddings + blocks.
        self.expected_num_hidden_layers = DEPTH

    def get_config(self) -> PrithviConfig:
        return PrithviConfig.from_preset("prithvi_eo_v2_tiny", img_size=self.image_size, bands=BAND_NAMES,
                                         embed_dim=EMBED, num_heads=HEADS, depth=DEPTH)

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values}


class PrithviEncoderCommonTest(_NotApplicable, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (PrithviEncoder,)

    def setUp(self):
        self.model_tester = PrithviEncoderModelTester(self)
        self.config_tester = ConfigTester(self, config_class=PrithviConfig, has_text_modality=False,
                                          embed_dim=EMBED, depth=DEPTH, num_heads=HEADS)

    def test_config(self):
        self.config_tester.run_common_tests()


class Stage2RefinerModelTester(PrithviEncoderModelTester):
    def get_config(self) -> Stage2RefinerConfig:
        return Stage2RefinerConfig(backbone_config=super().get_config(), head_width=16, num_convnext_blocks=2,
                                   metadata_embed_dim=8, drop_path_rate=0.0, lora_dropout=0.0)

    def prepare_config_and_inputs_for_common(self):
        opt_v1 = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size], scale=0.5)
        month = torch.tensor([1, 12, -1, 6][: self.batch_size])
        biome = torch.tensor([0, 16, 7, -1][: self.batch_size])
        return self.get_config(), {"opt_v1": opt_v1, "month": month, "biome": biome}


class Stage2RefinerCommonTest(_NotApplicable, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (Stage2RefinerModel,)
    _is_composite = True  # the backbone's PrithviConfig is a sub-config

    def setUp(self):
        self.model_tester = Stage2RefinerModelTester(self)
        self.config_tester = ConfigTester(self, config_class=Stage2RefinerConfig, has_text_modality=False,
                                          head_width=16, num_convnext_blocks=2)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """Some common tests (eager vs SDPA) pass only `main_input_name` (`opt_v1`); the refiner also needs the
        tile's month and biome: add "unknown" ones (`UNKNOWN_METADATA`, -1) for the batch when they are missing."""
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        opt_v1 = inputs_dict.get("opt_v1")
        if opt_v1 is not None:
            for name in ("month", "biome"):
                if name not in inputs_dict:
                    inputs_dict[name] = torch.full((opt_v1.shape[0],), -1, dtype=torch.long, device=opt_v1.device)
        return inputs_dict

    def test_config(self):
        """`ConfigTester.run_common_tests` without the composite save/load check, which is
        `test_config_composite_save_load` below."""
        tester = self.config_tester
        tester.create_and_test_config_common_properties()
        tester.create_and_test_config_to_json_string()
        tester.create_and_test_config_to_json_file()
        tester.create_and_test_config_from_and_save_pretrained()
        tester.create_and_test_config_from_and_save_pretrained_subfolder()
        tester.create_and_test_config_with_num_labels()
        tester.check_config_arguments_init()
        tester.create_and_test_config_from_pretrained_custom_kwargs()
        tester.check_config_can_be_init_without_params()

    # `Stage2RefinerConfig.to_dict()` stores the whole backbone sub-config, as the composite check expects.
    def test_config_composite_save_load(self):
        self.config_tester.create_and_test_config_from_and_save_pretrained_composite()


class Stage2RefinerAllOptionsModelTester(Stage2RefinerModelTester):
    """The refiner with every optional module: the spectral correction and MLP and the non-negative output that
    training builds, the range of the training spectra (`out_of_range_fallback`, its buffers unfitted) and the
    near-black rule (`near_black_fallback`, keeping only the NDVI of `opt_v1`: `near_black_keep="ndvi"`)."""

    def get_config(self) -> Stage2RefinerConfig:
        return Stage2RefinerConfig(backbone_config=PrithviEncoderModelTester.get_config(self), head_width=16,
                                   num_convnext_blocks=2, metadata_embed_dim=8, drop_path_rate=0.0, lora_dropout=0.0,
                                   spectral_correction="affine", spectral_mlp_hidden_size=8, nonnegative_output=True,
                                   out_of_range_fallback=True, near_black_fallback=True, near_black_keep="ndvi")


class Stage2RefinerAllOptionsCommonTest(Stage2RefinerCommonTest):
    def setUp(self):
        super().setUp()
        self.model_tester = Stage2RefinerAllOptionsModelTester(self)
