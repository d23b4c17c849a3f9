"""ControlNetPipeline: text-to-image with spatial conditions (Zhang et al. 2023): `LatentPipeline`'s denoising loop,
with one or several ControlNets adding their residuals to the UNet at every step.

| code name                        | symbol    | meaning                                                            |
|----------------------------------|-----------|--------------------------------------------------------------------|
| `image`                          | c_i       | the condition of each ControlNet, (B, C, H, W) in [0, 1] once prepared |
| `controlnet_conditioning_scale`  | s_k       | weight of ControlNet k's residuals                                 |
| `control_guidance_start`, `_end` | [a_k, b_k]| ControlNet k acts at step i of N when a_k ≤ i/N and (i+1)/N ≤ b_k  |
| residuals                        | r, r_mid  | Σ_k s_k · ControlNet_k(z_t, t, c, c_i^k): added to the UNet's skips and middle |

With classifier-free guidance the ControlNets see both halves of the batch, [∅, c], with the same condition
image; in `guess_mode` they see the conditional half only, the unconditional half gets no residual, and the
residuals are weighted 0.1·s … s from the shallowest skip to the middle (diffusers' guess mode: the ControlNet
must recognise the content without the prompt's help). Same images as diffusers' StableDiffusionControlNetPipeline
on the same weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentdiff.conditioning import vae_scale_factor
from latentdiff.models.controlnet import ControlNetModel
from pipelines.latent_pipeline import LatentPipeline, PipelineOutput
from pipelines.loading import load_parts, model_dir


@dataclass(frozen=True)
class _Control:
    """One call's conditions: per ControlNet its prepared image (B_c, C, H, W), scale s_k and window [a_k, b_k]."""

    images: list[torch.Tensor]
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guidance: bool  # classifier-free guidance on: the batch is [∅, c]
    num_images_per_prompt: int
    guess_mode: bool


class ControlNetPipeline(LatentPipeline):
    """`LatentPipeline` plus ControlNets: `ControlNetPipeline(unet, scheduler, vae, text_encoder, tokenizer,
    controlnet=net_or_list)`, or `ControlNetPipeline.from_pretrained(sd_folder, controlnet=folder_or_model)`; with
    only `controlnet=` (and an optional prompt), the embedded default model.

    `controlnet` is a `ControlNetModel`, a folder holding one (diffusers' ControlNetModel layout), or a list of
    them. Each must fit the UNet (same skips) and the VAE (its condition embedding shrinks images by the VAE
    factor); otherwise it is refused here, by name.
    """

    def __init__(
        self,
        unet=None,
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        controlnet: ControlNetModel | str | Path | list | tuple | None = None,
        prompt=None,
        sampling_settings=None,
    ) -> None:
        super().__init__(
            unet, scheduler, vae, text_encoder, tokenizer, prompt=prompt, sampling_settings=sampling_settings
        )
        if controlnet is None:
            raise TypeError(
                "ControlNetPipeline needs controlnet=: a ControlNetModel, a folder holding one, or a list of them"
            )
        nets = list(controlnet) if isinstance(controlnet, list | tuple) else [controlnet]
        if not nets:
            raise ValueError("controlnet is an empty list: pass at least one ControlNet")
        self.controlnets = [self._as_controlnet(net) for net in nets]
        self._control: _Control | None = None

    def _as_controlnet(self, net: ControlNetModel | str | Path) -> ControlNetModel:
        if isinstance(net, str | Path):
            net = ControlNetModel.from_pretrained(net).to(device=self.device, dtype=self.dtype)
        if not isinstance(net, ControlNetModel):
            raise TypeError(f"controlnet must be a ControlNetModel or a folder, got {type(net).__name__}")
        net.check_compatible(self.unet)
        vae_factor = vae_scale_factor(self.vae)
        if net.config.condition_factor != vae_factor:
            raise ValueError(
                f"this ControlNet's condition embedding shrinks images {net.config.condition_factor}x "
                f"(conditioning_embedding_out_channels={net.config.conditioning_embedding_out_channels}) but the "
                f"VAE's factor is {vae_factor}: it was made for another VAE"
            )
        return net

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        controlnet: ControlNetModel | str | Path | list | tuple | None = None,
        torch_dtype: torch.dtype | None = None,
        scheduler=None,
    ) -> ControlNetPipeline:
        """A Stable Diffusion folder (as `LatentPipeline.from_pretrained`) with `controlnet` (models or folders;
        folders load in `torch_dtype`)."""
        directory = model_dir(path_or_hub_id)
        if controlnet is None:  # a folder written by save_pretrained: its controlnet/, controlnet_1/, ...
            controlnet = sorted(directory.glob("controlnet*/"), key=lambda p: (len(p.name), p.name))
        return cls(**load_parts(directory, torch_dtype, scheduler), controlnet=controlnet or None)

    def save_pretrained(
        self, save_directory: str | Path, model_card: str | None = None, sampling_settings=None
    ) -> None:
        """`LatentPipeline.save_pretrained`'s folder plus the ControlNets in `controlnet/` (then `controlnet_1/`,
        ...), as diffusers' StableDiffusionControlNetPipeline writes and reads it."""
        super().save_pretrained(save_directory, model_card, sampling_settings)
        directory = Path(save_directory)
        for k, net in enumerate(self.controlnets):
            net.save_pretrained(directory / ("controlnet" if k == 0 else f"controlnet_{k}"))
        index = json.loads((directory / "model_index.json").read_text())
        kind = "ControlNetModel" if len(self.controlnets) == 1 else "MultiControlNetModel"
        index.update(_class_name="StableDiffusionControlNetPipeline", controlnet=["diffusers", kind])
        (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    def to(self, device=None, dtype=None) -> ControlNetPipeline:
        """Move the UNet, VAE, text encoder and ControlNets; returns self."""
        super().to(device=device, dtype=dtype)
        for net in self.controlnets:
            net.to(device=device, dtype=dtype)
        return self

    # ----------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: Any = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guess_mode: bool = False,
        **kwargs: Any,
    ) -> PipelineOutput:
        """Generate images from text and conditions; every `LatentPipeline.__call__` argument also applies.

        Args:
            image: the condition: for one ControlNet, a PIL image, a (H, W, C) / (B, H, W, C) array or a
                (C, H, W) / (B, C, H, W) tensor in [0, 1], or a list of PIL images (B_c = 1, or one per prompt);
                for K ControlNets, a list of K such conditions. Resized to height × width when its size differs
                (diffusers' VaeImageProcessor: Lanczos for PIL images).
            height, width: image size; default: the (first) condition's size, rounded down to a multiple of the
                VAE factor (as diffusers); must suit the UNet as in `LatentPipeline`.
            guidance_scale, num_images_per_prompt: as `LatentPipeline.__call__` (guidance: the carried sampling
                settings' by default).
            controlnet_conditioning_scale: s_k, one for all ControlNets or one per ControlNet (0 switches one off).
            control_guidance_start, control_guidance_end: [a_k, b_k] in [0, 1], fractions of the steps during
                which ControlNet k acts; one for all or one per ControlNet.
            guess_mode: see the module docstring.
        """
        from diffusers.image_processor import VaeImageProcessor

        k = len(self.controlnets)
        conditions = self._per_net(image, "image", lists_are_batches=k == 1)
        if any(c is None for c in conditions):
            raise ValueError("image is missing: pass the condition image of every ControlNet")
        processor = VaeImageProcessor(
            vae_scale_factor=vae_scale_factor(self.vae), do_convert_rgb=True, do_normalize=False
        )
        first = conditions[0][0] if isinstance(conditions[0], list | tuple) else conditions[0]
        height, width = processor.get_default_height_width(first, height, width)
        images = [
            processor.preprocess(c, height=height, width=width).to(device=self.device, dtype=net.dtype)
            for c, net in zip(conditions, self.controlnets)
        ]
        starts = self._per_net(control_guidance_start, "control_guidance_start")
        ends = self._per_net(control_guidance_end, "control_guidance_end")
        for start, end in zip(starts, ends):
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(
                    f"control_guidance_start={start} and control_guidance_end={end} must satisfy "
                    "0 <= start < end <= 1 (fractions of the steps)"
                )
        scales = [
            float(s) for s in self._per_net(controlnet_conditioning_scale, "controlnet_conditioning_scale")
        ]
        _, guidance_scale = self.resolve_sampling(None, guidance_scale)
        self._control = _Control(
            images, scales, starts, ends, guidance_scale > 1.0, num_images_per_prompt, guess_mode
        )
        try:
            return super().__call__(
                prompt,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt,
                height=height,
                width=width,
                **kwargs,
            )
        finally:
            self._control = None

    def _per_net(self, value: Any, name: str, lists_are_batches: bool = False) -> list:
        """One value per ControlNet: a list of K, or one value for all (a list of one ControlNet's batch too)."""
        k = len(self.controlnets)
        if isinstance(value, list | tuple) and not lists_are_batches:
            if len(value) != k:
                raise ValueError(f"{name} has {len(value)} entries for {k} ControlNets: pass one, or {k}")
            return list(value)
        return [value] * k

    def _unet_output(
        self, model_input: torch.Tensor, t: torch.Tensor, context: torch.Tensor, i: int
    ) -> torch.Tensor:
        """ε_θ(z_t, t, c) with the ControlNets' residuals Σ_k r_k added (those active at step i)."""
        control, steps = self._control, len(self.scheduler.timesteps)
        down, mid = None, None
        for net, image, scale, start, end in zip(
            self.controlnets, control.images, control.scales, control.starts, control.ends
        ):
            if scale == 0.0 or i / steps < start or (i + 1) / steps > end:
                continue  # off at this step: exactly the UNet without it
            d, m = self._residuals(net, image, scale, model_input, t, context)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return self.unet(
            model_input, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )

    def _residuals(
        self,
        net: ControlNetModel,
        image: torch.Tensor,
        scale: float,
        model_input: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One ControlNet's (r_i, r_mid) for the batch `model_input` ([∅, c] halves under guidance)."""
        control = self._control
        conditional_only = control.guess_mode and control.guidance
        if conditional_only:
            model_input, context = model_input.chunk(2)[1], context.chunk(2)[1]
        batch = model_input.shape[0] // (2 if control.guidance and not conditional_only else 1)
        image = _expand_condition(image, batch, control.num_images_per_prompt)
        if control.guidance and not conditional_only:
            image = torch.cat([image, image])
        down, mid = net(
            model_input,
            t,
            context,
            image,
            conditioning_scale=scale,
            guess_mode=control.guess_mode,
            return_dict=False,
        )
        if conditional_only:  # no residual for the unconditional half
            down = [torch.cat([torch.zeros_like(r), r]) for r in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid


def _expand_condition(image: torch.Tensor, batch: int, num_images_per_prompt: int) -> torch.Tensor:
    """(B_c, C, H, W) -> (B, C, H, W): one condition for every image, or one per prompt repeated per image."""
    if image.shape[0] == 1:
        return image.repeat_interleave(batch, dim=0)
    if image.shape[0] * num_images_per_prompt != batch:
        raise ValueError(
            f"image has a batch of {image.shape[0]} conditions for {batch // num_images_per_prompt} prompts: "
            "pass one condition for all, or one per prompt"
        )
    return image.repeat_interleave(num_images_per_prompt, dim=0)


__all__ = ["ControlNetPipeline"]
