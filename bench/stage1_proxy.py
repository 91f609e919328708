"""A stand-in Stage 1 generator that is not `data_builders.degrade`: Stage 1 outputs for quality checks.

    .venv/bin/python bench/stage1_proxy.py --data_dir data/sample/tiles --output_dir /tmp/stage1 [--seed 0]
                                           [--style_spread 1]

The refiner must not be tuned to the project's own synthetic degradation: real Stage 1 outputs come from
generators it has never seen. This script writes `<tile_id>.npz` files (`opt_v1`, float32 reflectance, the
layout `stage2-build-dataset --stage1_dir` reads) from another error model, written independently of
`degrade.py`, with different functional forms:

- the generator works at half resolution: 2x2 area downsampling, bicubic upsampling back;
- a per-tile "style" in log space: `log(opt) = A log(x + e) + c`, A = I + a random band-mixing perturbation
  (spread 0.06) with NIR pulled towards the visible bands, c a colour cast (spread 0.08); e = 0.01 keeps water
  finite;
- NIR regressed towards the tile mean by 25 % (a generator's typical hedging in the least predictable band);
- texture hallucination: 4 % of the high-pass detail of another tile of the same split, band by band;
- spatially correlated multiplicative noise (a 6x6 grid of 4 % log-normal values, bicubic), plus 1 % white noise.

Each tile's stream is seeded by (seed, tile id). The point is a different family of errors, not realism.

`--style_spread` scales the random part of the per-tile style: the spreads of the band-mixing perturbation and of the
cast (1, the default: as above; 0: neither). The NIR leaning and regression, the texture and the noise are drawn as
before, from the same stream. It sets how much of the colour error differs from tile to tile, which no correction
fitted on other tiles can know.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_builders.tiles import read_tile  # noqa: E402
from modeling_stage2._files import staged_folder  # noqa: E402

LOG_EPSILON = 0.01


def _rng(seed: int, tile_id: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.blake2b(f"{seed}:{tile_id}".encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(digest)


def _resample(image: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False)[0]


def generate(target: np.ndarray, detail_source: np.ndarray, rng: np.random.Generator,
             style_spread: float = 1.0) -> np.ndarray:
    """One tile's Stage 1 stand-in from its (4, H, W) reflectance and another tile's (for hallucinated detail), its
    random per-tile style scaled by `style_spread`."""
    x = torch.from_numpy(target.astype(np.float32))
    size = x.shape[-1]
    coarse = _resample(F.avg_pool2d(x[None], 2)[0], size).clamp(min=0.0)
    mixing = np.eye(4) + rng.normal(0.0, 0.06 * style_spread, (4, 4))
    mixing[3, :3] += rng.uniform(0.05, 0.15, 3) / 3  # NIR leaning on the visible bands
    cast = rng.normal(0.0, 0.08 * style_spread, 4)
    logs = torch.log(coarse + LOG_EPSILON)
    styled = torch.exp(torch.einsum("ij,jhw->ihw", torch.from_numpy(mixing).float(), logs)
                       + torch.from_numpy(cast).float()[:, None, None]) - LOG_EPSILON
    styled[3] = 0.75 * styled[3] + 0.25 * styled[3].mean()
    detail = torch.from_numpy(detail_source.astype(np.float32))
    high_pass = detail - _resample(F.avg_pool2d(detail[None], 4)[0], size)
    styled = styled + 0.04 * high_pass
    field = torch.from_numpy(rng.normal(0.0, 0.04, (4, 6, 6))).float()
    styled = styled * torch.exp(_resample(field, size))
    styled = styled + torch.from_numpy(rng.normal(0.0, 0.01, styled.shape)).float()
    return styled.clamp(0.0, 1.0).numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=str(REPO / "data" / "sample" / "tiles"))
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style_spread", type=float, default=1.0,
                        help="scale of the random per-tile colour style (1: as documented, 0: none)")
    args = parser.parse_args(argv)
    if not args.style_spread >= 0:  # also rejects nan
        print(f"stage1_proxy: error: --style_spread must be 0 or more, got {args.style_spread}", file=sys.stderr)
        return 2
    tiles = sorted(Path(args.data_dir).glob("*/*.npz"))
    if not tiles:
        print(f"stage1_proxy: error: no tiles under {args.data_dir}/*/", file=sys.stderr)
        return 2
    by_split: dict[str, list] = {}
    for path in tiles:
        by_split.setdefault(path.parent.name, []).append(read_tile(path))
    with staged_folder(Path(args.output_dir)) as staging:
        for split_tiles in by_split.values():
            for index, tile in enumerate(split_tiles):
                donor = split_tiles[(index + 1) % len(split_tiles)]
                opt_v1 = generate(tile.target, donor.target, _rng(args.seed, tile.tile_id), args.style_spread)
                opt_v1[:, ~tile.valid_mask] = 0.0
                np.savez_compressed(staging / f"{tile.tile_id}.npz", opt_v1=opt_v1.astype(np.float32))
    print(f"Wrote {len(tiles)} Stage 1 stand-ins to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
