"""PatchGAN discriminator for the adversarial term of Stage 2 training.

A pix2pix-style "N-layer" discriminator: `num_layers` strided 4x4 convolutions, one 4x4
convolution of stride 1, and a 4x4 convolution to a one-channel map of patch scores (no
sigmoid: the least-squares GAN losses in `training.losses` take raw scores). Every convolution
but the first is followed by instance norm; every one but the last by LeakyReLU(0.2).

With the default `num_layers=3`, each score sees a 70 x 70 pixel patch (the "70x70 PatchGAN");
a 120 x 120 tile gives a 13 x 13 score map. `receptive_field` and `output_size(...)` compute
both for any configuration.

The weights are saved as safetensors (`save_pretrained` writes `discriminator.safetensors` and
`discriminator_config.json`, names that do not collide with the generator's files in the same
folder).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "discriminator_config.json"
WEIGHTS_NAME = "discriminator.safetensors"
KERNEL_SIZE = 4
PADDING = 1


@dataclass
class PatchDiscriminatorConfig:
    """Configuration of `PatchDiscriminator`.

    Args:
        in_channels: bands of the input images (4: B02, B03, B04, B08 reflectance).
        base_channels: width of the first convolution; layer i has
            `base_channels * min(2**i, max_channel_multiplier)` channels.
        num_layers: number of stride-2 convolutions (depth). More layers see larger patches:
            receptive field 16, 34, 70, 142, 286 pixels for 1..5 layers.
        max_channel_multiplier: cap on the width multiplier of deeper layers.
        negative_slope: slope of the LeakyReLU activations.
        init_std: standard deviation of the normal init of convolution weights (pix2pix: 0.02).
    """

    in_channels: int = 4
    base_channels: int = 64
    num_layers: int = 3
    max_channel_multiplier: int = 8
    negative_slope: float = 0.2
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("in_channels", "base_channels", "num_layers", "max_channel_multiplier"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PatchDiscriminatorConfig.{name} must be an integer >= 1, got {value!r}.")
        if not 0 <= self.negative_slope < 1:
            raise ValueError(f"PatchDiscriminatorConfig.negative_slope must be in [0, 1), got {self.negative_slope!r}.")
        if not self.init_std > 0:
            raise ValueError(f"PatchDiscriminatorConfig.init_std must be > 0, got {self.init_std!r}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PatchDiscriminatorConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PatchDiscriminatorConfig keys {unknown}; known keys: {sorted(known)}.")
        return cls(**values)


class DiscriminatorBlock(nn.Module):
    """4x4 convolution, optional instance norm, optional LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: bool, activation: float | None):
        super().__init__()
        # Instance norm removes a per-channel bias, so the conv before it has none.
        self.conv = nn.Conv2d(in_channels, out_channels, KERNEL_SIZE, stride=stride, padding=PADDING, bias=not norm)
        self.norm = nn.InstanceNorm2d(out_channels, affine=True) if norm else nn.Identity()
        self.activation = nn.LeakyReLU(activation) if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: (B, in_channels, H, W) -> (B, 1, h, w) raw patch scores.

    The arguments are the fields of `PatchDiscriminatorConfig` (documented there);
    `PatchDiscriminator.from_config(config)` builds one from a config.
    """

    def __init__(
        self,
        in_channels: int = 4,
        base_channels: int = 64,
        num_layers: int = 3,
        max_channel_multiplier: int = 8,
        negative_slope: float = 0.2,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.config = PatchDiscriminatorConfig(
            in_channels=in_channels,
            base_channels=base_channels,
            num_layers=num_layers,
            max_channel_multiplier=max_channel_multiplier,
            negative_slope=negative_slope,
            init_std=init_std,
        )
        c = self.config
        widths = [c.base_channels * min(2**i, c.max_channel_multiplier) for i in range(c.num_layers + 1)]
        slope = c.negative_slope
        blocks = [DiscriminatorBlock(c.in_channels, widths[0], stride=2, norm=False, activation=slope)]
        blocks += [
            DiscriminatorBlock(widths[i - 1], widths[i], stride=2, norm=True, activation=slope)
            for i in range(1, c.num_layers)
        ]
        last = c.num_layers
        blocks.append(DiscriminatorBlock(widths[last - 1], widths[last], stride=1, norm=True, activation=slope))
        blocks.append(DiscriminatorBlock(widths[c.num_layers], 1, stride=1, norm=False, activation=None))
        self.blocks = nn.ModuleList(blocks)
        self.post_init()

    @classmethod
    def from_config(cls, config: PatchDiscriminatorConfig) -> "PatchDiscriminator":
        return cls(**config.to_dict())

    # ------------------------------------------------------------------ init
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.InstanceNorm2d) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def post_init(self) -> None:
        self.apply(self._init_weights)

    # ------------------------------------------------------------------ geometry
    @property
    def strides(self) -> list[int]:
        return [block.conv.stride[0] for block in self.blocks]

    @property
    def receptive_field(self) -> int:
        """Side, in input pixels, of the patch that one output score sees."""
        field = 1
        for stride in reversed(self.strides):
            field = (field - 1) * stride + KERNEL_SIZE
        return field

    def layer_sizes(self, size: int) -> list[int]:
        """Spatial side after each block for an input of side `size`."""
        sizes = []
        for stride in self.strides:
            size = (size + 2 * PADDING - KERNEL_SIZE) // stride + 1
            sizes.append(size)
        return sizes

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return self.layer_sizes(height)[-1], self.layer_sizes(width)[-1]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"PatchDiscriminator input has shape {tuple(x.shape)}; expected (B, {self.config.in_channels}, H, W)."
            )
        for side in x.shape[-2:]:
            # Instance norm needs more than one value per channel; the last block's output must exist.
            sizes = self.layer_sizes(int(side))
            if min(sizes[1:-1], default=2) < 2 or sizes[-1] < 1:
                raise ValueError(
                    f"input of {tuple(x.shape[-2:])} pixels is too small for num_layers={self.config.num_layers} "
                    f"(per-layer sizes {sizes}); use fewer layers or larger images."
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        for block in self.blocks:
            x = block(x)
        return x

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `discriminator_config.json` and `discriminator.safetensors` into `save_directory`.

        Each file is written to a temporary name and renamed, so a crash leaves no half file.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        _atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(state, str(path), metadata={"format": "pt"}))
        config_text = json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n"
        _atomic_write(directory / CONFIG_NAME, lambda path: Path(path).write_text(config_text))
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> "PatchDiscriminator":
        """Load a discriminator written by `save_pretrained`."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: expected a folder written by PatchDiscriminator.save_pretrained."
                )
        try:
            config = PatchDiscriminatorConfig.from_dict(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as error:
            raise ValueError(f"{config_path}: invalid discriminator config: {error}") from error
        model = cls.from_config(config)
        state = load_file(str(weights_path), device=str(map_location))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if missing or unexpected or mismatched:
            raise ValueError(
                f"{weights_path} does not match {config_path}: missing keys {missing}, unexpected keys {unexpected}, "
                f"shape mismatches {mismatched}. Save the config and weights together with save_pretrained."
            )
        model.load_state_dict(state)
        return model


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "PatchDiscriminator", "PatchDiscriminatorConfig"]
