"""Random inpainting masks for training an SD-inpainting UNet, as Stable Diffusion's inpainting model was trained
(synthetic masks, and in a quarter of the samples the whole image masked; Rombach et al. 2022, model card of
stable-diffusion-inpainting).

| code name   | symbol | meaning                                                                               |
|-------------|--------|---------------------------------------------------------------------------------------|
| `masks`     | m      | (B, 1, H, W) in {0, 1}: 1 = repaint, 0 = keep (the pipelines' convention)               |
| `full`      |        | per sample, with probability p_full: m = 1 everywhere (the text-to-image case)          |
| `MAX_SHAPES`| K      | otherwise m is the union of 1 to K shapes, each a rectangle or an ellipse ("blob")      |

Each shape: centre uniform over the image, half-width and half-height uniform in [H/16, H/4] (so one shape covers
1/64 to 1/4 of the image), rectangle or ellipse with probability 1/2. Every number comes from the micro-batch's
`BatchRandom`, so masks are the same whatever the process count and a resumed run draws the same ones.
"""

from __future__ import annotations

import torch

from train.randomness import BatchRandom

MAX_SHAPES = 3  # K: shapes per mask
MIN_HALF_SIZE, MAX_HALF_SIZE = 1 / 16, 1 / 4  # half-sides of a shape, as fractions of the image side


def random_masks(rng: BatchRandom, height: int, width: int, full_mask_prob: float) -> torch.Tensor:
    """m: (B, 1, H, W) float32 in {0, 1}, B = the micro-batch's local size (see the module docstring)."""
    count = 1 + (rng.rand() * MAX_SHAPES).long().clamp(max=MAX_SHAPES - 1)  # (B,) in {1, …, K}
    centre = rng.rand(MAX_SHAPES, 2)  # (B, K, 2): (y, x) in [0, 1)
    half = MIN_HALF_SIZE + (MAX_HALF_SIZE - MIN_HALF_SIZE) * rng.rand(MAX_SHAPES, 2)  # (B, K, 2)
    ellipse = rng.rand(MAX_SHAPES) < 0.5  # (B, K)
    full = rng.rand() < full_mask_prob  # (B,)
    device = centre.device
    y = ((torch.arange(height, device=device) + 0.5) / height)[None, None, :, None]  # (1, 1, H, 1)
    x = ((torch.arange(width, device=device) + 0.5) / width)[None, None, None, :]  # (1, 1, 1, W)
    dy = (y - centre[..., 0, None, None]).abs() / half[..., 0, None, None]  # (B, K, H, 1), 1 on the edge
    dx = (x - centre[..., 1, None, None]).abs() / half[..., 1, None, None]  # (B, K, 1, W)
    inside = torch.where(ellipse[..., None, None], dy**2 + dx**2 <= 1, (dy <= 1) & (dx <= 1))  # (B, K, H, W)
    used = torch.arange(MAX_SHAPES, device=device)[None, :] < count[:, None]  # (B, K)
    masks = (inside & used[..., None, None]).any(dim=1, keepdim=True) | full[:, None, None, None]
    return masks.float()
