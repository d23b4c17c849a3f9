"""Images and masks that the editing pipelines take: read, checked, batched and encoded to latents.

| code name       | symbol | meaning                                                                                  |
|-----------------|--------|------------------------------------------------------------------------------------------|
| `images`        | x₀     | (B, 3, H, W) in [-1, 1], H and W divisible by the VAE factor × the UNet's down-sampling   |
| `masks`         | m      | (B, 1, H, W) in {0, 1}: 1 (white) = repaint, 0 (black) = keep, as diffusers' inpainting   |
| `image_latents` | z₀     | (B, C, h, w) = E(x₀) · scaling_factor: the posterior mean, or a sample of it              |

A PIL image is read as RGB; a PIL mask as grayscale ("L"): 0 keeps a pixel, 255 repaints it, and any other value is
an error (an anti-aliased or JPEG mask has them): threshold it first, e.g. `mask.point(lambda v: 255 * (v >= 128))`.
The pipelines never resize: an image of a size the VAE and UNet cannot take, or a mask of another size than its
image, is an error naming the sizes that work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from latentdiff.conditioning import encode_images

ImageInput = PIL.Image.Image | Sequence[PIL.Image.Image] | torch.Tensor


def image_tensor(image: ImageInput, multiple: int, name: str = "image") -> torch.Tensor:
    """x₀ as a float32 (B, 3, H, W) tensor in [-1, 1].

    image: a PIL image, a list of them (one size), or a (B, 3, H, W) / (3, H, W) tensor already in [-1, 1].
    multiple: H and W must be multiples of it (the VAE factor × the UNet's down-sampling factor).
    """
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, PIL.Image.Image) for i in image):
        sizes = {i.size for i in image}
        if len(sizes) > 1:
            raise ValueError(
                f"{name}: the images have different sizes {sorted(sizes)}; pass images of one size."
            )
        pixels = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) for i in image])  # (B, H, W, 3)
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
    elif isinstance(image, torch.Tensor) and image.ndim in (3, 4) and image.shape[-3] == 3:
        tensor = (image[None] if image.ndim == 3 else image).float()
        if tensor.min() < -1.0 - 1e-6 or tensor.max() > 1.0 + 1e-6:
            raise ValueError(
                f"{name} is a tensor with values in [{tensor.min():.3g}, {tensor.max():.3g}]; pass pixels in "
                "[-1, 1] (x / 127.5 - 1 for uint8 x), or a PIL image."
            )
    else:
        raise TypeError(
            f"{name} must be a PIL image, a list of PIL images or a (B, 3, H, W) tensor in [-1, 1], got "
            f"{_describe(image)}."
        )
    height, width = tensor.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(
            f"{name} is {width}x{height} pixels (width x height), but this model takes sides divisible by "
            f"{multiple} (the VAE factor × the UNet's down-sampling factor): crop or resize it to, e.g., "
            f"{max(multiple, width // multiple * multiple)}x{max(multiple, height // multiple * multiple)}."
        )
    return tensor


def mask_tensor(mask: ImageInput, size: tuple[int, int], name: str = "mask_image") -> torch.Tensor:
    """m as a float32 (B, 1, H, W) tensor in {0, 1} (1 = repaint); `size` is the image's (H, W).

    mask: a PIL image (read as grayscale: 0 keep, 255 repaint), a list of them, or a tensor (B, 1, H, W),
    (1, H, W) or (H, W) of 0s and 1s.
    """
    if isinstance(mask, PIL.Image.Image):
        mask = [mask]
    if isinstance(mask, (list, tuple)) and mask and all(isinstance(m, PIL.Image.Image) for m in mask):
        values = np.stack([np.asarray(m.convert("L")) for m in mask])  # (B, H, W) uint8
        unexpected = np.unique(values[(values != 0) & (values != 255)])
        if unexpected.size:
            raise ValueError(
                f"{name} is not binary: besides 0 (keep) and 255 (repaint) it has grey values "
                f"{unexpected[:5].tolist()}{'...' if unexpected.size > 5 else ''}; threshold it first, e.g. "
                "mask.point(lambda v: 255 * (v >= 128))."
            )
        tensor = torch.from_numpy(values == 255).float()[:, None]
    elif isinstance(mask, torch.Tensor) and mask.ndim in (2, 3, 4) and (mask.ndim < 3 or mask.shape[-3] == 1):
        tensor = mask.float().reshape(-1, 1, *mask.shape[-2:])
        if not torch.all((tensor == 0) | (tensor == 1)):
            raise ValueError(
                f"{name} is not binary: a mask tensor holds 0 (keep) and 1 (repaint) only; threshold it first, "
                "e.g. (mask >= 0.5).float()."
            )
    else:
        raise TypeError(
            f"{name} must be a PIL image, a list of them, or a (B, 1, H, W) tensor of 0s and 1s, got "
            f"{_describe(mask)}."
        )
    if tuple(tensor.shape[-2:]) != tuple(size):
        raise ValueError(
            f"{name} is {tensor.shape[-1]}x{tensor.shape[-2]} pixels but the image is {size[1]}x{size[0]} "
            "(width x height); pass a mask of the image's size."
        )
    return tensor


def batched(tensor: torch.Tensor, num_prompts: int, num_images_per_prompt: int, name: str) -> torch.Tensor:
    """One entry per image of a prompt-major batch of B = P · N: one entry is used for all, P entries one each."""
    if tensor.shape[0] == 1:
        return tensor.repeat(num_prompts * num_images_per_prompt, *([1] * (tensor.ndim - 1)))
    if tensor.shape[0] == num_prompts:
        return tensor.repeat_interleave(num_images_per_prompt, dim=0)
    raise ValueError(
        f"{name} has {tensor.shape[0]} entries for {num_prompts} prompts; pass one (used for every prompt) or one "
        "per prompt."
    )


def encode_image_latents(
    vae,
    images: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    sample_posterior: bool = False,
) -> torch.Tensor:
    """z₀ of each image, (B, C, h, w), scaled by the VAE scaling factor, in the VAE's dtype.

    sample_posterior: False takes the posterior mean (deterministic); True draws z₀ ~ N(μ, σ²) with `generator`
    (diffusers' editing pipelines do; a list of B generators draws image i's with generator i), which suits a VAE
    trained with a KL term and not one whose σ was never trained.
    """
    if not sample_posterior:
        return encode_images(vae, images)
    if isinstance(generator, list):
        return torch.cat([encode_images(vae, x[None], g, sample=True) for x, g in zip(images, generator)])
    return encode_images(vae, images, generator, sample=True)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}"
