"""Plain-torch port of the Prithvi-EO-2.0 encoder (`PrithviViT` of IBM/terratorch), numerically identical.

State-dict keys are the official ones without the `encoder.` prefix, so official checkpoints load after the
prefix is stripped (see `convert_prithvi.py`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging

from .configuration_prithvi import PrithviConfig

logger = logging.get_logger(__name__)


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) table: sin of position x frequency, then cos (MAE convention)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=positions.dtype, device=positions.device)
    omega = 1.0 / 10000 ** (omega / (embed_dim / 2.0))
    angles = positions.reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _coordinate_dtype(scale: torch.Tensor) -> torch.dtype:
    """The dtype of the coordinates' sin-cos: at least float32, whatever the model's (the scaled result is cast
    back). float16/bfloat16 hold a year's angle (~2000 rad) only to 1 rad / 8 rad, so its sin-cos is noise."""
    return torch.promote_types(scale.dtype, torch.float32)


def sincos_3d_table(embed_dim: int, grid_size: tuple[int, int, int], device=None) -> torch.Tensor:
    """The official fixed position table, (1, 1 + t*h*w, embed_dim) float32, zero row for the CLS token first.

    Computed in float64 and rounded once, as the official numpy code does. Width is split 6/16 for w,
    6/16 for h and 4/16 for t; tokens are ordered t, h, w (the Conv3d output flattened).
    """
    t_size, h_size, w_size = grid_size
    w_dim = h_dim = embed_dim // 16 * 6
    t_dim = embed_dim // 16 * 4

    def axis(size: int, dim: int) -> torch.Tensor:
        return sincos_1d(dim, torch.arange(size, dtype=torch.float64, device=device))

    w_table = axis(w_size, w_dim)[None, None, :, :].expand(t_size, h_size, w_size, w_dim)
    h_table = axis(h_size, h_dim)[None, :, None, :].expand(t_size, h_size, w_size, h_dim)
    t_table = axis(t_size, t_dim)[:, None, None, :].expand(t_size, h_size, w_size, t_dim)
    table = torch.cat([w_table, h_table, t_table], dim=-1).reshape(-1, embed_dim)
    table = torch.cat([table.new_zeros(1, embed_dim), table], dim=0)
    return table.to(torch.float32).unsqueeze(0)


@dataclass
class PrithviEncoderOutput(ModelOutput):
    """
    Output of [`PrithviEncoder`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + num_patches, embed_dim)`):
            Tokens after the final LayerNorm, CLS token first, patches ordered (t, h, w).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            One `(batch_size, 1 + num_patches, embed_dim)` tensor per block (returned when
            `output_hidden_states=True`); the last one is after the final LayerNorm, as the official
            `forward_features` returns them.
        grid_size (`tuple[int, int, int]`):
            The patch grid (t, h, w) of the tokens, for reshaping them into feature maps.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            One `(batch_size, num_heads, 1 + num_patches, 1 + num_patches)` tensor of softmax attention weights per
            block (returned when `output_attentions=True`; each row sums to 1). Only the eager attention computes
            them: with another `attn_implementation` the tuple is empty (and transformers warns), as in ViT. Last
            field, so that the tuple positions of the other fields are those of earlier releases.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    grid_size: tuple[int, int, int] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class PrithviPatchEmbed(nn.Module):
    """Conv3d patch embedding (kernel = stride = patch): (B, C, T, H, W) -> (B, t*h*w, E)."""

    def __init__(self, config: PrithviConfig):
        super().__init__()
        patch = tuple(config.patch_size)
        self.proj = nn.Conv3d(config.in_chans, config.embed_dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class PrithviTemporalEncoder(nn.Module):
    """Sin-cos encoding of (year, day of year) per frame, times `scale` (the -TL variants)."""

    def __init__(self, config: PrithviConfig):
        super().__init__()
        self.year_dim = config.embed_dim // 2
        self.day_dim = config.embed_dim - self.year_dim
        if config.coords_scale_learn:
            self.scale = nn.Parameter(torch.empty(1))
        else:
            self.register_buffer("scale", torch.ones(1))  # final value here too (as `_init_weights` sets it)

    def forward(self, temporal_coords: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
        batch, frames = temporal_coords.shape[:2]
        dtype = _coordinate_dtype(self.scale)
        coords = temporal_coords.to(dtype)
        year = sincos_1d(self.year_dim, coords[:, :, 0].flatten()).reshape(batch, frames, -1)
        day = sincos_1d(self.day_dim, coords[:, :, 1].flatten()).reshape(batch, frames, -1)
        embedding = (self.scale.to(dtype) * torch.cat([year, day], dim=-1)).to(self.scale.dtype)
        return torch.repeat_interleave(embedding, tokens_per_frame, dim=1)


class PrithviLocationEncoder(nn.Module):
    """Sin-cos encoding of (lat, lon), one vector per sample, times `scale` (the -TL variants)."""

    def __init__(self, config: PrithviConfig):
        super().__init__()
        self.lat_dim = config.embed_dim // 2
        self.lon_dim = config.embed_dim - self.lat_dim
        if config.coords_scale_learn:
            self.scale = nn.Parameter(torch.empty(1))
        else:
            self.register_buffer("scale", torch.ones(1))  # final value here too (as `_init_weights` sets it)

    def forward(self, location_coords: torch.Tensor) -> torch.Tensor:
        dtype = _coordinate_dtype(self.scale)
        coords = location_coords.to(dtype)
        lat = sincos_1d(self.lat_dim, coords[:, 0].flatten()).unsqueeze(1)
        lon = sincos_1d(self.lon_dim, coords[:, 1].flatten()).unsqueeze(1)
        return (self.scale.to(dtype) * torch.cat([lat, lon], dim=-1)).to(self.scale.dtype)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch attention (ViT's): (B, heads, N, d) inputs -> ((B, N, heads, d) output, (B, heads, N, N) weights)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class PrithviAttention(nn.Module):
    """Multi-head self-attention with a fused `qkv` projection (timm layout, as the official checkpoints store it).

    The attention itself goes through transformers' attention interface: `config._attn_implementation` picks
    `eager_attention_forward` ("eager"), `F.scaled_dot_product_attention` ("sdpa"), flash attention or flex
    attention (where the hardware and installed kernels have them).
    """

    def __init__(self, config: PrithviConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.head_size = config.embed_dim // config.num_heads
        self.scaling = self.head_size**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=True)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim, bias=True)

    def forward(
        self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_size)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        context, attn_weights = attention_interface(
            self, query, key, value, None, dropout=0.0, scaling=self.scaling, **kwargs
        )
        return self.proj(context.reshape(batch, tokens, width)), attn_weights


class PrithviMLP(nn.Module):
    def __init__(self, config: PrithviConfig):
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.embed_dim, hidden, bias=True)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, config.embed_dim, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class PrithviBlock(GradientCheckpointingLayer):
    """Pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: PrithviConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = PrithviAttention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = PrithviMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.attn(self.norm1(hidden_states), **kwargs)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.norm2(hidden_states))
        return hidden_states, attn_weights


class PrithviPreTrainedModel(PreTrainedModel):
    config: PrithviConfig
    config_class = PrithviConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["PrithviBlock"]
    _input_embed_layer = "patch_embed"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Official initialisation: xavier-uniform linears and patch conv (the conv seen as a linear), zero biases,
        unit LayerNorms, N(0, 0.02) CLS token, the fixed sin-cos position table, coordinate scales 0.1 (learned) or
        1 (fixed). Every parameter and buffer is set here, through `transformers.initialization` (which skips
        tensors already loaded and works on models built on the meta device)."""
        if isinstance(module, nn.Conv3d):
            # MAE/Prithvi: xavier_uniform_ of the weight viewed as (embed_dim, in_chans * t * h * w).
            fan_out, fan_in = module.weight.shape[0], module.weight[0].numel()
            bound = math.sqrt(3.0) * math.sqrt(2.0 / float(fan_in + fan_out))
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (PrithviTemporalEncoder, PrithviLocationEncoder)):
            init.constant_(module.scale, 0.1 if isinstance(module.scale, nn.Parameter) else 1.0)
        elif isinstance(module, PrithviEncoder):
            init.normal_(module.cls_token, std=module.config.initializer_range)
            table = sincos_3d_table(module.config.embed_dim, module.config.grid_size, device=module.pos_embed.device)
            init.copy_(module.pos_embed, table)


class PrithviEncoder(PrithviPreTrainedModel):
    """
    The Prithvi-EO-2.0 encoder: Conv3d patch embedding, CLS token, fixed 3D sin-cos position table, optional
    temporal/location encodings (-TL variants), pre-norm transformer blocks, final LayerNorm.

    `forward(pixel_values)` takes already normalised (B, C, H, W) or (B, C, T, H, W) input. Like the official
    code, H and W are cropped to a multiple of the patch (the Conv3d stride drops the remainder): callers that
    must keep every pixel pad first (e.g. 120 -> 126 for the 14-px patch).
    """

    def __init__(self, config: PrithviConfig):
        super().__init__(config)
        self.patch_embed = PrithviPatchEmbed(config)
        if "time" in config.coords_encoding:
            self.temporal_embed_enc = PrithviTemporalEncoder(config)
        if "location" in config.coords_encoding:
            self.location_embed_enc = PrithviLocationEncoder(config)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.embed_dim))
        # Fixed (never trained) and saved, as in the official checkpoints. Computed here as well as in
        # `_init_weights`: a model built without weight initialisation must hold the same buffers.
        self.register_buffer("pos_embed", sincos_3d_table(config.embed_dim, config.grid_size))
        self.blocks = nn.ModuleList(PrithviBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        temporal_coords: torch.Tensor | None = None,
        location_coords: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PrithviEncoderOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, C, H, W)` or `(B, C, T, H, W)`):
                Normalised input, channels in the order of `config.bands`. A 4-D input is one frame.
            temporal_coords (`torch.FloatTensor` of shape `(B, T, 2)`, *optional*):
                (year, day of year) per frame; used by models with `"time"` in `coords_encoding`.
            location_coords (`torch.FloatTensor` of shape `(B, 2)`, *optional*):
                (lat, lon); used by models with `"location"` in `coords_encoding`.
            output_hidden_states (`bool`, *optional*):
                Return the per-block hidden states; defaults to `config.output_hidden_states`.
            return_dict (`bool`, *optional*):
                Return a [`PrithviEncoderOutput`] instead of a tuple; defaults to `config.return_dict`.
            output_attentions (`bool`, *optional*):
                Return each block's attention weights in `attentions`; defaults to `config.output_attentions`.
                Only the eager attention computes them (`attn_implementation="eager"`); other implementations
                return an empty tuple and transformers warns, as for ViT.
            kwargs:
                Passed to the attention implementation (e.g. flash-attention arguments).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        pixel_values = self._check_pixel_values(pixel_values)
        grid_size = self._grid_size(pixel_values.shape[-3:])
        embeddings = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        pos_embed = self.interpolate_pos_encoding(grid_size).to(embeddings.dtype)
        embeddings = embeddings + pos_embed[:, 1:, :]
        batch, frames = pixel_values.shape[0], pixel_values.shape[2]
        if temporal_coords is not None and hasattr(self, "temporal_embed_enc"):
            _check_coords(temporal_coords, "temporal_coords", (batch, frames, 2),
                          "year, day of year per sample and frame")
            tokens_per_frame = embeddings.shape[1] // grid_size[0]
            embeddings = embeddings + self.temporal_embed_enc(temporal_coords, tokens_per_frame)
        if location_coords is not None and hasattr(self, "location_embed_enc"):
            _check_coords(location_coords, "location_coords", (batch, 2), "lat, lon per sample")
            embeddings = embeddings + self.location_embed_enc(location_coords)

        cls_tokens = (self.cls_token + pos_embed[:, :1, :]).expand(embeddings.shape[0], -1, -1)
        hidden_states = torch.cat([cls_tokens, embeddings], dim=1)

        all_hidden_states, all_attentions = [], []
        for block in self.blocks:
            hidden_states, attn_weights = block(hidden_states, output_attentions=output_attentions, **kwargs)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if output_attentions and attn_weights is not None:
                all_attentions.append(attn_weights)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states[-1] = hidden_states

        output = PrithviEncoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            grid_size=grid_size,
            attentions=tuple(all_attentions) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()

    def interpolate_pos_encoding(self, grid_size: tuple[int, int, int]) -> torch.Tensor:
        """The position table for an input patch grid (t, h, w), as the official `_interpolate_pos_encoding`:
        recomputed for another frame count, then bicubically resized (align_corners=True) in h and w. Resized also
        when the grid already matches (the identity, bit for bit), so that no size comparison stops a trace."""
        table_grid = tuple(self.config.grid_size)
        frames, height, width = grid_size
        table = self.pos_embed
        if frames != table_grid[0]:
            table_grid = (frames, *table_grid[1:])
            table = sincos_3d_table(self.config.embed_dim, table_grid, device=table.device)
        cls_pos, patch_pos = table[:, :1], table[:, 1:].float()
        patch_pos = patch_pos.reshape(*table_grid, self.config.embed_dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(height, width), mode="bicubic", align_corners=True)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, self.config.embed_dim)
        return torch.cat([cls_pos.float(), patch_pos], dim=1).to(self.pos_embed.dtype)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim == 4:
            pixel_values = pixel_values.unsqueeze(2)  # one frame
        if pixel_values.ndim != 5:
            raise ValueError(
                f"pixel_values must be (B, C, H, W) or (B, C, T, H, W), got shape {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[1] != self.config.in_chans:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the encoder expects {self.config.in_chans} "
                f"({', '.join(self.config.bands)}); select those bands or build the config with matching `bands`."
            )
        return pixel_values

    def _grid_size(self, sample_shape) -> tuple[int, int, int]:
        frames, height, width = (int(size) for size in sample_shape)
        patch_t, patch_h, patch_w = self.config.patch_size
        grid = (frames // patch_t, height // patch_h, width // patch_w)
        if min(grid) < 1:
            raise ValueError(
                f"Input (T, H, W) = {tuple(sample_shape)} is smaller than one patch {tuple(self.config.patch_size)}."
            )
        if (height % patch_h or width % patch_w or frames % patch_t) and not torch.jit.is_tracing():
            logger.warning_once(
                f"Input (T, H, W) = {(frames, height, width)} is not a multiple of the patch "
                f"{tuple(self.config.patch_size)}: the border is dropped, as in the official model. Pad the input "
                "to keep every pixel."
            )
        return grid


def _check_coords(coords, name: str, shape: tuple[int, ...], meaning: str) -> None:
    """Refuse coordinates that are not a tensor of `shape` with an error naming `name`, before the encodings'
    indexing and broadcasting fail with a message that names neither."""
    if not torch.is_tensor(coords) or tuple(coords.shape) != shape:
        got = f"shape {tuple(coords.shape)}" if torch.is_tensor(coords) else type(coords).__name__
        raise ValueError(f"{name} must be a tensor of shape {shape} ({meaning}), got {got}.")


# `import modeling_stage2` makes `AutoModel.from_pretrained(<a PrithviEncoder folder>)` work (the config half is
# registered in configuration_prithvi.py).
AutoModel.register(PrithviConfig, PrithviEncoder, exist_ok=True)


__all__ = [
    "PrithviEncoder",
    "PrithviEncoderOutput",
    "PrithviPreTrainedModel",
    "eager_attention_forward",
    "sincos_3d_table",
]
