"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a
trainable copy of the UNet's encoder and middle, fed a condition image through a small embedding network, joined
to the frozen UNet through zero-initialised 1x1 convolutions.

| code name                    | symbol        | meaning                                                            |
|------------------------------|---------------|--------------------------------------------------------------------|
| `controlnet_cond`            | c_i           | condition image (B, C_cond, H·f, W·f) in [0, 1], f the VAE factor   |
| `controlnet_cond_embedding`  | E(·)          | c_f = E(c_i): convs down to the latent size, last conv zero (eq. 9)  |
| `down_blocks`, `mid_block`   | F(·; Θ_c)     | the trainable copy of the UNet's encoder (eq. 2), same block types   |
| `controlnet_down_blocks`     | Z(·; Θ_z)     | one zero 1x1 conv per skip h_i of the copy                          |
| `controlnet_mid_block`       | Z(·; Θ_z2)    | the zero 1x1 conv on the middle's output                           |
| `conditioning_scale`         | s             | every residual multiplied by s                                      |

    h = conv_in(z_t) + E(c_i);  (m, [h_i]) = F(h, e_t, τ_θ(y));  r_i = s · Z_i(h_i),  r_mid = s · Z(m)

and the frozen UNet adds r_i to its skip h_i and r_mid to its middle output (`ConditionalUNet.forward`'s
`down_block_additional_residuals` / `mid_block_additional_residual`). At initialisation every Z is zero, so the
UNet with the ControlNet computes exactly what it did without (eq. 3 of the paper).

The blocks are the UNet's own (`latentdiff.models.unet.build_encoder`); the parameter names, `config.json` and
weights file are those of diffusers' `ControlNetModel`, so its folders load as they are
(`latentdiff.models.unet_diffusers` translates the config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.models.unet import (
    ConditionalUNet,
    UNetConfig,
    UNetEncoderMixin,
    build_encoder,
    check_unused_kwargs,
    lora_scale,
)

# diffusers' ControlNetConditioningEmbedding default channels: three stride-2 convs, f = 8 (Stable Diffusion's VAE)
DEFAULT_CONDITIONING_CHANNELS = (16, 32, 96, 256)
CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """A UNet's encoder shape (the `UNetConfig` fields; `out_channels` and the up path unused) plus the condition
    embedding's. Saved as diffusers' ControlNetModel `config.json` (`latentdiff.models.unet_diffusers`)."""

    conditioning_channels: int = 3  # C_cond of the condition image
    conditioning_embedding_out_channels: tuple[int, ...] = DEFAULT_CONDITIONING_CHANNELS  # E's convs; one
    # stride-2 conv between consecutive entries, so the image side is 2**(len - 1) times the latent side
    conditioning_channel_order: str = "rgb"  # "bgr": the condition's channels are flipped before E

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.conditioning_channels < 1 or not self.conditioning_embedding_out_channels:
            raise ValueError(
                f"conditioning_channels={self.conditioning_channels} and conditioning_embedding_out_channels="
                f"{self.conditioning_embedding_out_channels!r} must be positive / non-empty"
            )
        if self.conditioning_channel_order not in CHANNEL_ORDERS:
            raise ValueError(
                f"conditioning_channel_order={self.conditioning_channel_order!r}; use one of {CHANNEL_ORDERS}"
            )

    @property
    def condition_factor(self) -> int:
        """Condition image side / latent side: 2**(number of stride-2 convs in E)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @property
    def global_pool_conditions(self) -> bool:
        """diffusers' pipelines read it (a shuffle-ControlNet option): never set here."""
        return False

    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` dict of the equivalent diffusers `ControlNetModel`."""
        from latentdiff.models.unet_diffusers import controlnet_config_to_diffusers

        return controlnet_config_to_diffusers(self)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> ControlNetConfig:
        """Read a diffusers `ControlNetModel` config dict; refuse what this ControlNet cannot express."""
        from latentdiff.models.unet_diffusers import controlnet_config_from_diffusers

        return controlnet_config_from_diffusers(config)


@dataclass
class ControlNetOutput:
    """`ControlNetModel(..., return_dict=True)`: the residuals r_i (one per UNet skip) and r_mid."""

    down_block_res_samples: list[torch.Tensor]
    mid_block_res_sample: torch.Tensor


def zero_conv(channels: int) -> nn.Conv2d:
    """Z(·): a 1x1 convolution with weight and bias zero (Zhang et al. 2023, sec. 3.1)."""
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ConditionEmbedding(nn.Module):
    """E(·): condition image (B, C_cond, H·f, W·f) -> (B, C_0, H, W). A 3x3 conv, then per step a 3x3 conv and a
    stride-2 3x3 conv, SiLU after each, and a zero-initialised 3x3 conv out (diffusers'
    ControlNetConditioningEmbedding; the paper has 4x4 stride-2 kernels and ReLU)."""

    def __init__(self, out_channels: int, in_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for cin, cout in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(cin, cin, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(cin, cout, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(condition))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNetModel(UNetEncoderMixin, nn.Module):
    """The ControlNet of a `ConditionalUNet` (see the module docstring), with diffusers' parameter names.

    `ControlNetModel.from_unet(unet)` copies the UNet's encoder as the paper initialises it;
    `ControlNetModel.from_pretrained(folder)` loads a diffusers ControlNetModel folder (safetensors).
    """

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        if not isinstance(config, ControlNetConfig):
            raise TypeError(
                f"config must be a ControlNetConfig, got {type(config).__name__}; for a diffusers config.json "
                f"dict use ControlNetConfig.from_diffusers(...), for a UNet ControlNetModel.from_unet(unet)"
            )
        self.config = c = config
        self.conv_in, self.time_embedding, self.down_blocks, self.mid_block = build_encoder(c)
        self.controlnet_cond_embedding = ConditionEmbedding(
            c.block_out_channels[0], c.conditioning_channels, c.conditioning_embedding_out_channels
        )
        self.controlnet_down_blocks = nn.ModuleList(zero_conv(ch) for ch in c.skip_channels)
        self.controlnet_mid_block = zero_conv(c.block_out_channels[-1])

    @classmethod
    def from_unet(
        cls,
        unet: ConditionalUNet,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] = DEFAULT_CONDITIONING_CHANNELS,
        load_weights_from_unet: bool = True,
    ) -> ControlNetModel:
        """A ControlNet for `unet`: its encoder config, and (by default) a copy of its encoder's weights; the
        condition embedding is random with a zero last conv, every Z zero. For a VAE of factor f, give
        `conditioning_embedding_out_channels` log2(f) + 1 entries (the default suits f = 8)."""
        fields = {f.name: getattr(unet.config, f.name) for f in dataclasses.fields(UNetConfig)}
        config = ControlNetConfig(
            **{**fields, "dropout": 0.0},  # diffusers' ControlNetModel has no dropout
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        )
        controlnet = cls(config).to(device=unet.device, dtype=unet.dtype)
        if load_weights_from_unet:
            for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
                getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
        return controlnet

    def check_compatible(self, unet: ConditionalUNet) -> None:
        """Refuse a UNet whose skips or text width differ from what this ControlNet's residuals fit."""
        mine, theirs = self.config, unet.config
        for name in ("skip_channels", "cross_attention_dim", "levels"):
            if getattr(mine, name) != getattr(theirs, name):
                raise ValueError(
                    f"this ControlNet was made for another UNet shape: its {name} is {getattr(mine, name)!r}, "
                    f"the UNet's {getattr(theirs, name)!r} (block_out_channels {mine.block_out_channels} vs "
                    f"{theirs.block_out_channels}, layers_per_block {mine.layers} vs {theirs.layers}); use a "
                    f"ControlNet trained for this UNet, or make one with ControlNetModel.from_unet(unet)"
                )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: int | float | torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        guess_mode: bool = False,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **diffusers_kwargs: Any,
    ) -> ControlNetOutput | tuple[list[torch.Tensor], torch.Tensor]:
        """The residuals for the UNet (diffusers' ControlNetModel call).

        Args:
            sample, timestep, encoder_hidden_states: as `ConditionalUNet.forward` (the UNet's z_t, t, τ_θ(y)).
            controlnet_cond: c_i, (B, C_cond, H·f, W·f), f = `config.condition_factor`, in [0, 1].
            conditioning_scale: s, the residuals' weight (0: the UNet is unchanged).
            guess_mode: weight the residuals s·10^(k/K − 1), k = 0 … K (the shallow ones 0.1·s, the middle s), as
                diffusers' guess mode does.
            cross_attention_kwargs: {"scale": s}: this model's LoRA adapters' weight for the call.
            return_dict: True: a `ControlNetOutput`; False: (down residuals, middle residual).
            diffusers_kwargs: `timestep_cond`, `added_cond_kwargs`, ... as diffusers' pipelines pass them: None.
        Returns:
            r_i shaped like the UNet's skips h_i, and r_mid shaped like its middle output.
        """
        timesteps = self._check_inputs(sample, timestep, encoder_hidden_states)
        check_unused_kwargs(type(self).__name__, diffusers_kwargs)
        self._check_condition(sample, controlnet_cond)
        if self.config.conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond.flip(1)
        with lora_scale(self, cross_attention_kwargs):
            emb = self._embed_time(timesteps, sample.dtype)  # e_t
            h = self.conv_in(sample) + self.controlnet_cond_embedding(
                controlnet_cond
            )  # conv_in(z_t) + E(c_i)
            mid, skips = self._encode(h, emb, encoder_hidden_states)
            down = [zero(skip) for zero, skip in zip(self.controlnet_down_blocks, skips)]
            mid = self.controlnet_mid_block(mid)
        scales = [conditioning_scale] * (len(down) + 1)
        if guess_mode:  # s·10^(k/K − 1): 0.1·s for the first skip up to s for the middle
            scales = (torch.logspace(-1, 0, len(down) + 1) * conditioning_scale).tolist()
        down = [r * scale for r, scale in zip(down, scales)]
        mid = mid * scales[-1]
        return ControlNetOutput(down, mid) if return_dict else (down, mid)

    def _check_condition(self, sample: torch.Tensor, condition: torch.Tensor) -> None:
        c, f = self.config, self.config.condition_factor
        expected = (sample.shape[0], c.conditioning_channels, sample.shape[2] * f, sample.shape[3] * f)
        if not torch.is_tensor(condition) or tuple(condition.shape) != expected:
            got = tuple(condition.shape) if torch.is_tensor(condition) else type(condition).__name__
            raise ValueError(
                f"controlnet_cond has shape {got}; this ControlNet needs {expected}: the latents' batch, "
                f"{c.conditioning_channels} channels and {f}x the latents' {sample.shape[2]}x{sample.shape[3]} "
                f"(its condition embedding halves the side {len(c.conditioning_embedding_out_channels) - 1} "
                f"times); resize the condition image to the generated image's size"
            )

    # ---- files (diffusers' folder layout: latentdiff.models.unet_diffusers) ----
    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write `config.json` (diffusers' ControlNetModel format) and `diffusion_pytorch_model.safetensors`."""
        from latentdiff.models.unet_diffusers import save_model

        save_model(self, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_path: str | Path, **kwargs: Any) -> ControlNetModel:
        """Load a folder written by `save_pretrained` or by diffusers' `ControlNetModel.save_pretrained`; keyword
        arguments as `latentdiff.models.unet_diffusers.load_controlnet` (subfolder, torch_dtype, allow_pickle,
        variant)."""
        from latentdiff.models.unet_diffusers import load_controlnet

        return load_controlnet(pretrained_model_path, **kwargs)


__all__ = ["ControlNetConfig", "ControlNetModel", "ControlNetOutput"]
