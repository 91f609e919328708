"""Training arguments of the Stage 2 refiner: `Stage2TrainingArguments` and `Stage2DataArguments`.

Like trl's `RewardConfig`, the training arguments are a `TrainingArguments` subclass that adds the
model, LoRA, quantization, loss and discriminator settings and changes a few defaults to the design's
values. Both dataclasses are parsed by `transformers.HfArgumentParser` from a YAML file plus command-line
overrides (see `training.train.parse_args`).
"""
import contextlib
import dataclasses
import enum
import json
import logging
import math
import types
import typing
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from data_builders.degrade import DEGRADATION_CHOICES
from data_builders.tiles import VALIDATION_SPLIT
from modeling_stage2.configuration_stage2 import (
    LORA_TARGETS,
    NEAR_BLACK_KEEPS,
    NEAR_BLACK_RAMP,
    NEAR_BLACK_THRESHOLD,
    OUT_OF_RANGE_RAMP,
    SPECTRAL_CORRECTIONS,
)
from modeling_stage2.vocabulary import INPUT_MODES, QUANTIZATIONS

from .spectral_range import OUT_OF_RANGE_QUANTILE

logger = logging.getLogger(__name__)

# Where the refiner's shared spectral correction (M, b) starts: the training split's least-squares colour fit refined
# under the objective's terms against the target (`Stage2Loss.target_terms`), the least-squares fit itself, or the
# identity.
SPECTRAL_CORRECTION_INITS = ("spectral_fit", "linear_fit", "identity")


# Inherited `TrainingArguments` fields that transformers leaves unchecked, as (name, valid(value, args), what it must
# be): out of range they crash the run once it has started (a zero batch size, an optimizer or seed that refuses the
# value) or make it train nothing, so they are refused with the other settings, before anything runs.
_TRAINER_RANGES = (
    ("learning_rate", lambda v, a: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("per_device_train_batch_size", lambda v, a: v >= 1, ">= 1"),
    ("per_device_eval_batch_size", lambda v, a: v >= 1, ">= 1"),
    ("gradient_accumulation_steps", lambda v, a: v >= 1, ">= 1"),
    ("max_steps", lambda v, a: v > 0 or v == -1, "> 0, or -1 to train for the number of epochs"),
    ("num_train_epochs", lambda v, a: a.max_steps > 0 or (math.isfinite(v) and v > 0),
     "a finite number > 0 (or set max_steps > 0)"),
    ("warmup_steps", lambda v, a: math.isfinite(v) and v >= 0,
     "a finite number >= 0 (steps, or a ratio of the total steps when below 1)"),
    # transformers turns an interval above 1 into an int (`int(inf)`: an OverflowError traceback), and a NaN one is
    # no interval; eval_steps / save_steps only where eval/save_every_epochs leaves them in use.
    ("logging_steps", lambda v, a: a.logging_strategy != "steps" or (math.isfinite(v) and v > 0),
     "a finite number > 0 (steps, or a ratio of the total steps when below 1)"),
    ("eval_steps", lambda v, a: v is None or a.eval_every_epochs is not None or a.eval_strategy != "steps"
     or (math.isfinite(v) and v > 0),
     "a finite number > 0 (steps, or a ratio of the total steps when below 1) or unset"),
    ("save_steps", lambda v, a: a.save_every_epochs is not None or a.save_strategy != "steps"
     or (math.isfinite(v) and v > 0), "a finite number > 0 (steps, or a ratio of the total steps when below 1)"),
    ("weight_decay", lambda v, a: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: no weight decay)"),
    ("adam_beta1", lambda v, a: 0 <= v < 1, "in [0, 1)"),
    ("adam_beta2", lambda v, a: 0 <= v < 1, "in [0, 1)"),
    ("adam_epsilon", lambda v, a: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("max_grad_norm", lambda v, a: v >= 0, ">= 0 (0: no gradient clipping)"),
    ("dataloader_num_workers", lambda v, a: v >= 0, ">= 0 (0: load in the main process)"),
    # transformers keeps every checkpoint for a limit <= 0: a negative one said nothing of that
    ("save_total_limit", lambda v, a: v is None or v >= 0, ">= 0 (0 or null: every checkpoint is kept)"),
    # The tiles' augmentation (and --redraw_degradation) is drawn per epoch in the loader's workers, which learn the
    # epoch only when they start: persistent workers would keep the first epoch's draws, unlike a resumed run.
    ("dataloader_persistent_workers", lambda v, a: not v or a.dataloader_num_workers == 0,
     "false (the data are drawn per epoch in the workers, which persistent workers would never learn of)"),
    # `Stage2Trainer` refuses it too, but only once the data are converted and the model built (a traceback)
    ("remove_unused_columns", lambda v, a: not v,
     "false (`target` and `valid_mask` are not forward arguments of the refiner: the Trainer would drop them)"),
    ("seed", lambda v, a: 0 <= v <= 2**32 - 1, f"in 0..{2**32 - 1} (numpy's seed range)"),
    ("data_seed", lambda v, a: v is None or 0 <= v <= 2**32 - 1, f"in 0..{2**32 - 1} (numpy's seed range) or unset"),
)


EVAL_METRIC_GROUPS = ("refined", "opt_v1")
"""Whose metrics an evaluation logs, as `eval_<group>_<metric>` (`training.metrics.METRIC_NAMES`), beside
`eval_loss`."""


def evaluation_metric_names() -> tuple[str, ...]:
    """The names `metric_for_best_model` can take: what an evaluation logs, with its `eval_` prefix."""
    from .metrics import METRIC_NAMES

    return ("eval_loss", *(f"eval_{group}_{name}" for group in EVAL_METRIC_GROUPS for name in METRIC_NAMES))


def greater_is_better(metric: str) -> bool:
    """Whether a larger `metric_for_best_model` is better: the metrics' own rule (`training.metrics.HIGHER_IS_BETTER`:
    PSNR and SSIM) for `[eval_][refined_]<metric>`; losses and every other name are smaller-is-better."""
    from .metrics import HIGHER_IS_BETTER

    name = metric.removeprefix("eval_").removeprefix("refined_")
    return HIGHER_IS_BETTER.get(name, False)


@dataclass
class Stage2TrainingArguments(TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] for the Stage 2 refiner, with the design's defaults (batch 1, gradient
    accumulation 8, learning rate 1e-4, cosine schedule after a linear warmup over 5 % of the steps, gradient
    clipping 1.0, 100 epochs, evaluation batch 4, best model chosen on the validation NDVI RMSE of the refined
    output, the model before the first step included: `eval_on_start`).

    Model:
        model_name_or_path (`str`, *optional*): a saved `Stage2RefinerModel` folder or Hub repo to start from
            (instead of building a new refiner from `backbone_preset`).
        backbone_preset (`str`, defaults to `"prithvi_eo_v2_600m"`): Prithvi preset of a new refiner's backbone.
        backbone_weights (`str`, *optional*): where the pretrained backbone comes from (Hub repo id, official `.pt`,
            converted folder); `None` initialises the backbone randomly.
        refiner_config_overrides (`dict` or JSON `str`, *optional*): extra `Stage2RefinerConfig` arguments (they win
            over the fields below that set the same config argument).
        spectral_correction (`str`, defaults to `"affine"`): the per-tile colour-correction branch of a new refiner
            (`Stage2RefinerConfig.spectral_correction`; `"shared"`: one correction for all tiles; `"none"`: the
            head's residual only).
        nonnegative_output (`bool`, defaults to `True`): a new refiner clamps its output at 0 reflectance
            (`Stage2RefinerConfig.nonnegative_output`).
        spectral_mlp_hidden_size (`int`, defaults to 32): width of a new refiner's per-pixel spectral MLP
            (`Stage2RefinerConfig.spectral_mlp_hidden_size`; 0: none).
        spectral_correction_init (`str`, defaults to `"spectral_fit"`): where the branch's shared correction starts,
            computed before training (not when resuming: the checkpoint has it): `"spectral_fit"`, the least-squares
            colour fit (4x4 + bias) of the training split's valid pixels refined for 300 steps under the run's
            terms against the target (the spectral loss, NDVI, EVI, SAM, and with a `reconstruction_weight` the L1
            too; `training.losses.Stage2Loss.target_terms`, `training.linear_fit.fit_spectral_correction`);
            `"linear_fit"`, the least-squares fit alone; or `"identity"`. With `"spectral_fit"` a spectral MLP is
            fitted too, on top of that affine fit (300 more steps on 6 tiles each); with the others, or in a refiner
            without the correction branch (`spectral_correction="none"`), it starts at zero.
        out_of_range_fallback (`bool`, defaults to `False`): a new refiner keeps `opt_v1` at pixels outside its
            training spectra (`Stage2RefinerConfig.out_of_range_fallback`); their range is fitted on the training
            split before training (not when resuming: the checkpoint has it), `training.spectral_range`.
        out_of_range_quantile (`float`, defaults to 0.99): with `out_of_range_fallback`, the quantile of the training
            pixels' own distances from their spectra beyond which `opt_v1` is blended back in.
        out_of_range_ramp (`float`, defaults to 2.0): with `out_of_range_fallback`, the multiple of that distance
            where the output is `opt_v1` entirely (`Stage2RefinerConfig.out_of_range_ramp`).
        near_black_fallback (`bool`, defaults to `False`): a new refiner keeps `opt_v1` at its near-black pixels
            (`Stage2RefinerConfig.near_black_fallback`: red + NIR up to `near_black_threshold`, blended up to
            `near_black_ramp` times it; `refiner_config_overrides` can change both).
        near_black_keep (`str`, defaults to `"pixel"`): with `near_black_fallback`, what of `opt_v1` is kept there:
            `"pixel"` all of it, `"ndvi"` only its NDVI (`Stage2RefinerConfig.near_black_keep`).
        quantization (`str`, defaults to `"8bit"`): backbone linear layers in `"8bit"`, `"4bit"` (NF4) or `"none"`.
        lora_r, lora_alpha, lora_dropout, lora_target_modules, unfreeze_last_n_blocks: LoRA settings.

    Loss:
        spectral_weight, ndvi_weight, evi_weight, sam_weight, identity_weight, edge_weight, adversarial_weight,
        reconstruction_weight: weights of `training.losses.Stage2Loss` (`None` keeps that class's default).

    Discriminator:
        disc_learning_rate_ratio (`float`, defaults to 0.1): discriminator learning rate / generator learning rate.
        disc_update_interval (`int`, defaults to 1): the discriminator steps every this many optimizer steps.
        disc_base_channels, disc_num_layers: `PatchDiscriminator` width and depth.

    Reproducibility:
        deterministic (`bool`, *optional*): use torch's deterministic algorithms (warn-only) so that a rerun or a
            resumed run gives bit-identical weights; by default on without CUDA and off on GPUs. Some kernels
            (e.g. the backward of an indexed assignment, `index_put` with accumulation) otherwise add in a
            thread-dependent order.

    Schedule:
        eval_every_epochs (`float`, defaults to 5): validation interval in epochs, converted to `eval_steps`
            (0 or `None` keeps the Trainer's `eval_strategy`/`eval_steps`).
        save_every_epochs (`float`, defaults to 10): checkpoint interval in epochs, converted to `save_steps`
            (0 or `None` keeps `save_strategy`/`save_steps`).
    """

    # ---- changed defaults of TrainingArguments (design values) ----
    num_train_epochs: float = field(
        default=100.0, metadata={"help": "Total number of training epochs.", "aliases": ["--epochs"]}
    )
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Batch size per device for evaluation."})
    gradient_accumulation_steps: int = field(
        default=8, metadata={"help": "Micro-batches accumulated before each optimizer step."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of the generator (AdamW)."})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule (after warmup).",
                                    "choices": [scheduler.value for scheduler in SchedulerType]}
    )
    warmup_steps: float = field(
        default=0.05, metadata={"help": "Linear warmup: steps, or a ratio of the total steps when below 1."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log the training losses every this many steps."})
    eval_on_start: bool = field(
        default=True,
        metadata={"help": "Validate before the first step: the starting model (e.g. at the spectral fit) is a "
                          "candidate for best/ too (not when resuming)."},
    )
    save_total_limit: int | None = field(
        default=3, metadata={"help": "Keep at most this many checkpoints (the newest and the best are kept)."}
    )
    metric_for_best_model: str | None = field(
        default="eval_refined_ndvi_rmse",
        metadata={"help": "Validation metric that selects the model written to `best/`."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: `target` and `valid_mask` are not forward arguments."}
    )
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Integrations to report to ('tensorboard' also writes previews)."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint folder to resume from, or 'latest' for the newest complete checkpoint in output_dir.",
            "aliases": ["--resume"],
        },
    )

    # ---- model ----
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Saved Stage2RefinerModel folder or Hub repo to start from."}
    )
    backbone_preset: str = field(
        default="prithvi_eo_v2_600m", metadata={"help": "Prithvi preset of the backbone of a new refiner."}
    )
    backbone_weights: str | None = field(
        default=None,
        metadata={"help": "Pretrained backbone: Hub repo id, official .pt or converted folder; unset = random init."},
    )
    refiner_config_overrides: dict | str | None = field(
        default=None, metadata={"help": "Extra Stage2RefinerConfig arguments (a mapping or a JSON string)."}
    )
    spectral_correction: str = field(
        default="affine",
        metadata={"help": "Colour-correction branch of a new refiner: affine (per tile), shared (one for all tiles) "
                          "or none.",
                  "choices": SPECTRAL_CORRECTIONS},
    )
    nonnegative_output: bool = field(
        default=True, metadata={"help": "A new refiner clamps its output at 0 reflectance (straight-through gradient)."}
    )
    spectral_mlp_hidden_size: int = field(
        default=32, metadata={"help": "Width of a new refiner's per-pixel spectral MLP (non-linear colour correction "
                                      "before the head); 0: none."}
    )
    spectral_correction_init: str = field(
        default="spectral_fit",
        metadata={"help": "Start of the shared colour correction: spectral_fit (least squares on the training split, "
                          "refined under the spectral loss, and the reconstruction L1 if weighted), linear_fit (least "
                          "squares) or identity.",
                  "choices": SPECTRAL_CORRECTION_INITS},
    )
    out_of_range_fallback: bool = field(
        default=False,
        metadata={"help": "A new refiner keeps opt_v1 at pixels whose spectrum lies outside its training spectra "
                          "(their range is fitted on the training split before training)."},
    )
    out_of_range_quantile: float = field(
        default=OUT_OF_RANGE_QUANTILE,
        metadata={"help": "With out_of_range_fallback: quantile of the training pixels' own distances from their "
                          "spectra beyond which opt_v1 is blended back in."},
    )
    out_of_range_ramp: float = field(
        default=OUT_OF_RANGE_RAMP,
        metadata={"help": "With out_of_range_fallback: multiple of that distance where the output is opt_v1 "
                          "entirely (> 1)."},
    )
    near_black_fallback: bool = field(
        default=False,
        metadata={"help": f"A new refiner keeps opt_v1 at its near-black pixels (red + NIR up to "
                          f"{NEAR_BLACK_THRESHOLD} reflectance, blended up to {NEAR_BLACK_RAMP:g} times that), where "
                          "NDVI is a ratio of noise."},
    )
    near_black_keep: str = field(
        default="pixel",
        metadata={"help": "With near_black_fallback, what of opt_v1 is kept at near-black pixels: pixel (all of it) "
                          "or ndvi (only its NDVI: the split of red + NIR; the refiner's own sum and other bands).",
                  "choices": NEAR_BLACK_KEEPS},
    )
    quantization: str = field(
        default="8bit",
        metadata={"help": "Backbone linear layers: 8bit, 4bit (NF4) or none.", "choices": QUANTIZATIONS},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS),
        metadata={"help": "Backbone linear layers that get LoRA (never patch_embed.proj)."},
    )
    unfreeze_last_n_blocks: int | None = field(
        default=None, metadata={"help": "Put LoRA only on the last N backbone blocks (unset: all blocks)."}
    )

    # ---- loss ----
    spectral_weight: float | None = field(default=None, metadata={"help": "Weight of the spectral loss (design 1.0)."})
    ndvi_weight: float | None = field(default=None, metadata={"help": "NDVI RMSE weight inside the spectral loss."})
    evi_weight: float | None = field(default=None, metadata={"help": "EVI RMSE weight inside the spectral loss."})
    sam_weight: float | None = field(default=None, metadata={"help": "Spectral-angle weight inside the spectral loss."})
    identity_weight: float | None = field(
        default=None, metadata={"help": "Weight of the identity L1 to opt_v1 (design 0.5)."}
    )
    edge_weight: float | None = field(
        default=None, metadata={"help": "Weight of the Sobel edge L1 inside the identity group (the L1 has 1)."}
    )
    adversarial_weight: float | None = field(
        default=None, metadata={"help": "Weight of the LSGAN generator loss (design 0.05); 0 trains no discriminator."}
    )
    reconstruction_weight: float | None = field(
        default=None, metadata={"help": "Weight of the L1 between the refined output and the target."}
    )

    # ---- discriminator ----
    disc_learning_rate_ratio: float = field(
        default=0.1, metadata={"help": "Discriminator learning rate as a fraction of learning_rate."}
    )
    disc_update_interval: int = field(
        default=1, metadata={"help": "Update the discriminator every this many optimizer steps."}
    )
    disc_base_channels: int = field(default=64, metadata={"help": "Width of the first PatchGAN layer."})
    disc_num_layers: int = field(default=3, metadata={"help": "Number of strided PatchGAN layers."})

    deterministic: bool | None = field(
        default=None,
        metadata={"help": "torch deterministic algorithms (warn-only), so that reruns and resumed runs are "
                          "bit-identical; unset: on without CUDA (cheap there), off on GPUs (slower kernels)."},
    )

    # ---- intervals in epochs ----
    eval_every_epochs: float | None = field(
        default=5.0,
        metadata={"help": "Validate every this many epochs (converted to eval_steps); 0: use eval_strategy."},
    )
    save_every_epochs: float | None = field(
        default=10.0,
        metadata={"help": "Checkpoint every this many epochs (converted to save_steps); 0: use save_strategy."},
    )

    def __post_init__(self):
        if isinstance(self.refiner_config_overrides, str):
            try:
                self.refiner_config_overrides = json.loads(self.refiner_config_overrides)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"refiner_config_overrides must be a mapping or a JSON object string, got "
                    f"{self.refiner_config_overrides!r} ({error})."
                ) from None
        if self.spectral_correction not in SPECTRAL_CORRECTIONS:
            raise ValueError(
                f"spectral_correction must be one of {SPECTRAL_CORRECTIONS}, got {self.spectral_correction!r}."
            )
        if self.spectral_correction_init not in SPECTRAL_CORRECTION_INITS:
            raise ValueError(
                f"spectral_correction_init must be one of {SPECTRAL_CORRECTION_INITS}, got "
                f"{self.spectral_correction_init!r}."
            )
        if not 0.0 < self.out_of_range_quantile < 1.0:
            raise ValueError(f"out_of_range_quantile must be in (0, 1), got {self.out_of_range_quantile}.")
        if not self.out_of_range_ramp > 1.0:
            raise ValueError(f"out_of_range_ramp must be > 1, got {self.out_of_range_ramp}.")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}.")
        if self.disc_update_interval < 1:
            raise ValueError(f"disc_update_interval must be >= 1, got {self.disc_update_interval}.")
        if not (math.isfinite(self.disc_learning_rate_ratio) and self.disc_learning_rate_ratio >= 0):
            raise ValueError(f"disc_learning_rate_ratio must be a finite number >= 0, got "
                             f"{self.disc_learning_rate_ratio}.")
        for name in ("eval_every_epochs", "save_every_epochs"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):  # NaN / inf: no step interval
                raise ValueError(
                    f"{name} must be a finite number > 0, or 0 / null to use the Trainer's own strategy; got {value}."
                )
            if value == 0:
                setattr(self, name, None)
        for name, valid, requirement in _TRAINER_RANGES:
            value = getattr(self, name)
            if not valid(value, self):
                raise ValueError(f"{name} must be {requirement}, got {value}.")
        if self.eval_every_epochs is not None:
            # Placeholder until the Trainer knows the steps per epoch (see `resolve_epoch_intervals`).
            self.eval_strategy, self.eval_steps = "steps", 1
        if self.save_every_epochs is not None:
            self.save_strategy, self.save_steps = "steps", 1
        self._check_integrations()
        self._check_loss_and_discriminator()
        known = evaluation_metric_names()
        if self.metric_for_best_model is not None and f"eval_{self.metric_for_best_model.removeprefix('eval_')}" \
                not in known:
            raise ValueError(f"metric_for_best_model must be one of the evaluation's metrics ({', '.join(known)}), "
                             f"with or without eval_; got {self.metric_for_best_model!r}.")
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = greater_is_better(self.metric_for_best_model)
        if self.gradient_checkpointing or self.activation_checkpointing:
            # Frozen (quantized) inputs + LoRA need the non-reentrant variant (transformers #21381, #26221).
            name = "activation_checkpointing_kwargs" if self.activation_checkpointing_kwargs else \
                "gradient_checkpointing_kwargs"
            kwargs = getattr(self, name) or {}
            with contextlib.suppress(json.JSONDecodeError):
                kwargs = json.loads(kwargs) if isinstance(kwargs, str) else kwargs
            if not isinstance(kwargs, dict):
                raise ValueError(f"{name} must be a mapping or a JSON object string, got {getattr(self, name)!r}.")
            self.activation_checkpointing_kwargs = {"use_reentrant": False, **kwargs}
            self.gradient_checkpointing_kwargs = None
        for half, bfloat in (("fp16", "bf16"), ("fp16_full_eval", "bf16_full_eval")):
            if getattr(self, half) and getattr(self, bfloat):  # one precision, on any device
                raise ValueError(f"{half} and {bfloat} are both true: set only one of them.")
        self.precision_note = self._resolve_precision()
        if self.deterministic is None:
            self.deterministic = not (torch.cuda.is_available() and not self.use_cpu)
        super().__post_init__()

    def _check_loss_and_discriminator(self) -> None:
        """The loss weights and the discriminator's size, through the checks of the classes they build (which the
        trainer builds only after the data and the model)."""
        from .discriminator import PatchDiscriminatorConfig
        from .losses import Stage2Loss

        Stage2Loss(**self.loss_weights())
        try:
            PatchDiscriminatorConfig(base_channels=self.disc_base_channels, num_layers=self.disc_num_layers)
        except ValueError as error:  # name the flags, not the config class
            raise ValueError(str(error).replace("PatchDiscriminatorConfig.", "disc_")) from None

    def _check_integrations(self) -> None:
        """`report_to` names integrations transformers has, and `hub_model_id` is a repo id: both would fail only
        once the trainer is built, after the data and the model."""
        from huggingface_hub.utils import validate_repo_id
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        if self.report_to is None:  # `report_to: null` in a file: no integration (transformers would look up None)
            self.report_to = "none"
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        unknown = [name for name in names if name not in ("all", "none", *INTEGRATION_TO_CALLBACK)]
        if unknown:
            raise ValueError(f"report_to: {unknown[0]!r} is not an integration transformers has; choose among "
                             f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}, 'all' or 'none'.")
        if self.hub_model_id is not None:
            try:
                validate_repo_id(self.hub_model_id)
            except ValueError:  # HFValidationError, with a message over several lines
                raise ValueError(f"hub_model_id {self.hub_model_id!r} is not a Hub repo id: use OWNER/NAME or NAME "
                                 "(letters, digits, '-', '_', '.').") from None

    def _resolve_precision(self) -> str:
        """fp16 (with a grad scaler) on CUDA, bf16 where the GPU supports it, fp32 on the CPU, said out loud."""
        on_cuda = torch.cuda.is_available() and not self.use_cpu
        requested = "fp16" if self.fp16 else "bf16" if self.bf16 else "fp32"
        if not on_cuda:
            self.fp16 = self.bf16 = False
            self.dataloader_pin_memory = False  # nothing to pin for
            if requested != "fp32":
                note = f"{requested} was requested but there is no CUDA device: training on the CPU in fp32."
                logger.warning(note)
                return note
            return "training on the CPU in fp32."
        if self.bf16 and not torch.cuda.is_bf16_supported():
            self.bf16, self.fp16 = False, True
            note = "bf16 was requested but this GPU does not support it: training in fp16 with a gradient scaler."
            logger.warning(note)
            return note
        if self.fp16:
            return "training on CUDA in fp16 with a gradient scaler."
        if self.bf16:
            return "training on CUDA in bf16."
        return "training on CUDA in fp32."

    def resolve_epoch_intervals(self, num_update_steps_per_epoch: int) -> None:
        """Turn `eval_every_epochs` / `save_every_epochs` into step intervals, once steps per epoch are known."""
        if num_update_steps_per_epoch < 1:
            raise ValueError(f"num_update_steps_per_epoch must be >= 1, got {num_update_steps_per_epoch}.")
        if self.eval_every_epochs is not None:
            self.eval_steps = max(1, round(self.eval_every_epochs * num_update_steps_per_epoch))
        if self.save_every_epochs is not None:
            self.save_steps = max(1, round(self.save_every_epochs * num_update_steps_per_epoch))

    def loss_weights(self) -> dict[str, float]:
        """The loss weights that were set (the others keep `Stage2Loss`'s defaults)."""
        names = (
            "spectral_weight",
            "ndvi_weight",
            "evi_weight",
            "sam_weight",
            "identity_weight",
            "edge_weight",
            "adversarial_weight",
            "reconstruction_weight",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class Stage2DataArguments:
    """Where the training data comes from and how it is prepared.

    Args:
        data_dir (`str`): NPZ tiles (`DATA_DIR/{train,val,test}/*.npz`, converted once to Arrow and cached) or a
            `DatasetDict` saved with `save_to_disk`.
        stage1_dir (`str`, *optional*): Stage 1 outputs (`<tile>.npz` with `opt_v1`); without it `opt_v1` is
            synthesised from the target by the data builders' degradation.
        max_samples (`int`, *optional*): use only the first N training tiles.
        max_eval_samples (`int`, *optional*): use only the first N validation tiles.
        input_mode (`str`, *optional*): how `opt_v1` is made: `"synthetic"` (degraded target, the default without
            `stage1_dir`), `"stage1"` (the default with it) or `"identity"`.
        dataset_seed (`int`, defaults to 0): seed of the synthetic degradation (like `degradation`, not used with an
            Arrow `data_dir`).
        degradation (`str`, defaults to `"mild"`): preset of the synthetic degradation (`DEGRADATION_CHOICES`):
            `"mild"`, `"strong"` (the wide systematic errors of a generator hallucinating from SAR) or `"mixture"`
            (each tile mild or strong, equal odds); see `docs/data.md`, "Degradation presets". Part of the dataset
            cache key. Not used when `data_dir` is already an Arrow dataset (a run whose value differs from the
            dataset's says so; it is recorded with the dataset's).
        dataset_cache_dir (`str`, *optional*): where converted datasets are cached (default: `OUTPUT_DIR/_dataset`).
        augment (`bool`, defaults to `True`): random flips / 90-degree rotations of the training tiles.
        brightness_augment (`list[float]`, *optional*): `[low, high]`: each training tile (target and opt_v1) is
            multiplied by a factor drawn log-uniformly from that range; shows the model dark scenes (water) whose
            NDVI/EVI are the most sensitive to small absolute errors.
        redraw_degradation (`bool`, defaults to `False`): draw the training tiles' synthetic `opt_v1` anew each epoch
            (epoch 0 keeps the dataset's own draw) and at each step of the spectral warm start, from the dataset's
            degradation (preset, parameters and seed of its build record): many draws of the Stage 1 errors per
            target instead of one. Needs a dataset whose `opt_v1` is synthetic; validation keeps its own draw.
        eval_split (`str`, defaults to `"val"`): the split used for validation.
    """

    data_dir: str | None = field(
        default=None, metadata={"help": "NPZ tiles folder (converted once, cached) or a saved Arrow DatasetDict."}
    )
    stage1_dir: str | None = field(default=None, metadata={"help": "Stage 1 outputs (<tile>.npz with opt_v1)."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N training tiles."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation tiles."})
    input_mode: str | None = field(
        default=None,
        metadata={"help": "How opt_v1 is made: synthetic (default without --stage1_dir), stage1 (default with it) "
                          "or identity.", "choices": INPUT_MODES},
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the synthetic opt_v1 degradation."})
    degradation: str = field(
        default="mild",
        metadata={"help": "Preset of the synthetic opt_v1 degradation: mild, strong or mixture (mild or strong per "
                          "tile).", "choices": DEGRADATION_CHOICES},
    )
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "Cache of converted datasets (default: OUTPUT_DIR/_dataset)."}
    )
    augment: bool = field(default=True, metadata={"help": "Random flips and 90-degree rotations of training tiles."})
    brightness_augment: list[float] | None = field(
        default=None,
        metadata={"help": "LOW HIGH: multiply each training tile (target and opt_v1) by a factor drawn log-uniformly "
                          "from [LOW, HIGH] (exposure augmentation; unset: off)."},
    )
    redraw_degradation: bool = field(
        default=False,
        metadata={"help": "Draw the training tiles' synthetic opt_v1 anew each epoch (and at each step of the "
                          "spectral warm start) from the dataset's degradation; needs synthetic opt_v1."},
    )
    eval_split: str = field(default=VALIDATION_SPLIT, metadata={"help": "Split used for validation."})

    def __post_init__(self):
        if self.brightness_augment is not None and (
            len(self.brightness_augment) != 2
            or not 0 < self.brightness_augment[0] <= self.brightness_augment[1] < math.inf
        ):  # an infinite factor would make a tile's target and opt_v1 infinite (training.data.TileDataset)
            raise ValueError(
                f"brightness_augment must be LOW HIGH with 0 < LOW <= HIGH, both finite, got {self.brightness_augment}."
            )
        for name in ("max_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {value}.")
        if self.dataset_seed < 0:  # refused by the dataset build, once the run had started
            raise ValueError(f"dataset_seed must be >= 0, got {self.dataset_seed}.")
        if self.degradation not in DEGRADATION_CHOICES:
            raise ValueError(f"degradation must be one of {DEGRADATION_CHOICES}, got {self.degradation!r}.")


def num_update_steps_per_epoch(num_samples: int, per_device_batch_size: int, world_size: int, accumulation: int,
                               drop_last: bool = False) -> int:
    """Optimizer steps in one epoch, as the Trainer counts them (the last partial accumulation still steps)."""
    batches = num_samples // per_device_batch_size if drop_last else math.ceil(num_samples / per_device_batch_size)
    batches_per_process = math.ceil(batches / world_size)
    return max(1, math.ceil(batches_per_process / accumulation))


# ------------------------------------------------------------------------------------------- typed settings
class SettingTypeError(ValueError):
    """A setting whose value is not of its field's type; the message says what was expected."""


def setting_types() -> dict:
    """Field name -> type annotation of every `Stage2TrainingArguments` / `Stage2DataArguments` field (None where an
    annotation does not resolve)."""
    annotations = {}
    for cls in (Stage2TrainingArguments, Stage2DataArguments):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation that does not resolve: use the raw ones
            hints = {}
        for item in dataclasses.fields(cls):
            hint = hints.get(item.name, item.type)
            annotations[item.name] = None if isinstance(hint, str) else hint
    return annotations


class _Mismatch(Exception):
    pass


_BOOL_WORDS = {"true": True, "yes": True, "y": True, "t": True, "1": True,
               "false": False, "no": False, "n": False, "f": False, "0": False}


# What unsets an optional number on the command line (`--max_samples none`), as `null` does in the YAML file:
# HfArgumentParser reads an `int | None` flag as an int, so nothing typed there could otherwise give None.
NONE_WORDS = ("none", "null")


def optional_number(hint) -> type | None:
    """`int` or `float` for an `int | None` / `float | None` annotation `hint`; None for any other."""
    members = set(typing.get_args(hint)) if _is_union(typing.get_origin(hint)) else set()
    numbers = members - {type(None)}
    return numbers.pop() if type(None) in members and len(numbers) == 1 and numbers <= {int, float} else None


def none_or(kind: type):
    """The argparse `type` of an optional number flag: `kind`, or None for a `NONE_WORDS` word (any case)."""
    def parse(text: str):
        return None if text.lower() in NONE_WORDS else kind(text)

    parse.__name__ = kind.__name__  # argparse's "invalid int value: 'x'" stays as it was
    return parse


def _scalar(value, kind):
    """`value` as an int, float, bool or str (`kind`), accepting what the same flag accepts on the command line."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise _Mismatch
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _Mismatch
    if kind is str:
        return str(value)
    try:
        number = float(value) if kind is float or isinstance(value, float) else int(value)
        if kind is int and number != int(number):
            raise _Mismatch  # 2.5 is no batch size
        return kind(number)
    except (TypeError, ValueError, OverflowError):
        raise _Mismatch from None


def _is_union(origin) -> bool:
    return origin in (typing.Union, types.UnionType)


def _convert(value, hint):
    """`value` (e.g. from YAML) as the annotation `hint` expects it; `_Mismatch` when it does not fit."""
    origin, members = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(origin):
        for member in members:
            with contextlib.suppress(_Mismatch):
                return _convert(value, member)
        raise _Mismatch
    if value is None or hint is type(None):
        if value is None and hint is type(None):
            return None
        raise _Mismatch  # null only where the field allows None
    if origin is typing.Literal:
        if value in members:
            return value
        raise _Mismatch
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list):
            raise _Mismatch
        return [_convert(item, members[0]) if members else item for item in value]
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if hint in (bool, int, float, str):
        return _scalar(value, hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if str(value) in {str(member.value) for member in hint}:
            return value
        raise _Mismatch
    return value  # other types (accelerator configs, ...) are checked by TrainingArguments itself


def describe_type(hint, plural: bool = False) -> str:
    """What `hint` expects, in words: "a float", "a list of floats or null", "one of ['no', 'steps', 'epoch']"."""
    origin, members = typing.get_origin(hint), typing.get_args(hint)
    names = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a float", "floats"),
             str: ("a string", "strings"), dict: ("a mapping", "mappings"), type(None): ("null", "nulls")}
    if hint in names:
        return names[hint][plural]
    if _is_union(origin):
        return " or ".join(describe_type(member, plural) for member in members)
    if origin is typing.Literal:
        return f"one of {list(members)}"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return f"one of {[member.value for member in hint]}"
    if origin in (list, tuple) or hint in (list, tuple):
        return f"a list of {describe_type(members[0], plural=True)}" if members else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def convert_setting(value, hint, choices=None):
    """`value` converted to the field type `hint` (None: unchecked) and checked against `choices`; a
    `SettingTypeError` saying what was expected ("expected a float, got 'fast'") when it does not fit."""
    try:
        converted = value if hint is None else _convert(value, hint)
    except _Mismatch:
        raise SettingTypeError(f"expected {describe_type(hint)}, got {_shown(value)}.") from None
    allowed = [str(choice) for choice in choices or ()]
    if allowed and converted is not None and str(converted) not in allowed:
        raise SettingTypeError(f"expected one of {allowed}, got {_shown(value)}.")
    return converted


def _shown(value) -> str:
    return "null" if value is None else repr(value)
