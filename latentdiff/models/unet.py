"""The conditional UNet of latent diffusion (Rombach et al. 2022, sec. 3.3), read leaf-first: timestep
embedding, ResBlock, down/up samplers, the UNet blocks, the config, then `ConditionalUNet`.

ε_θ(z_t, t, τ_θ(y)) maps noisy latents z_t (B, C, H, W), a timestep t and text embeddings τ_θ(y) (B, L, D)
to a tensor shaped like z_t (the noise ε, the velocity v or x̂₀: the UNet does not know which; the scheduler
does).

| code name               | symbol | meaning                                                                 |
|-------------------------|--------|-------------------------------------------------------------------------|
| `sample`                | z_t    | noisy latents (B, C_in, H, W), already scaled by the VAE scaling factor |
| `timestep`              | t      | integer (or fractional) diffusion step, 0 <= t < T                      |
| `encoder_hidden_states` | τ_θ(y) | text embeddings (B, L, D), D = `cross_attention_dim`                    |
| `emb`                   | e_t    | timestep embedding after its MLP, (B, 4·C_0)                            |
| `skips`                 | h_i    | feature maps saved on the way down, concatenated on the way up          |

Parameter names, the config file and the weights file are those of diffusers' `UNet2DConditionModel`: the
`unet/` folder of a Stable Diffusion 1.x/2.x repository in the diffusers layout loads as it is, and what
`save_pretrained` writes loads in diffusers. The translation of configs and the file I/O live in
`latentdiff.models.unet_diffusers`; this file is the architecture alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentdiff.models.attention import SpatialTransformer, TransformerBlock

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------------
# Timestep embedding


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 1e4,
) -> torch.Tensor:
    """Sinusoidal embedding of the timesteps (Vaswani et al. 2017, sec. 3.5; Ho et al. 2020, appendix B).

    With k = dim // 2 frequencies ω_j = max_period^(−j / (k − freq_shift)), j = 0 … k−1, the embedding of t
    is [sin(t ω), cos(t ω)], or [cos(t ω), sin(t ω)] when `flip_sin_to_cos` (Stable Diffusion), zero-padded to
    `dim`.

    Args:
        timesteps: (B,) integer or fractional steps.
        dim: embedding width.
    Returns:
        (B, dim) float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half - freq_shift))  # ω_j
    angles = timesteps[:, None].float() * frequencies[None, :]  # (B, k)
    pair = (angles.cos(), angles.sin()) if flip_sin_to_cos else (angles.sin(), angles.cos())
    return F.pad(torch.cat(pair, dim=-1), (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """The MLP on the sinusoidal embedding: Linear, SiLU, Linear."""

    def __init__(self, in_dim: int, emb_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, emb_dim)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, emb_dim)."""
        return self.linear_2(F.silu(self.linear_1(t_emb)))


# ------------------------------------------------------------------------------------------------------------
# ResBlock and samplers


class ResBlock(nn.Module):
    """Residual block with timestep injection (Ho et al. 2020, appendix B; guided-diffusion's ResBlock):

        h = conv1(SiLU(GroupNorm(x))) + Linear(SiLU(e_t))
        h = conv2(dropout(SiLU(GroupNorm(h))))
        out = skip(x) + h,  skip = 1x1 conv when the channel count changes, else identity.

    Args:
        in_channels, out_channels: channels of x and of the output.
        emb_dim: width of the timestep embedding e_t.
        norm_groups, norm_eps: GroupNorm groups and epsilon (both norms).
        dropout: dropout probability before conv2.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        norm_groups: int,
        norm_eps: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, H, W), emb (B, E) -> (B, C_out, H, W)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ------------------------------------------------------------------------------------------------------------
# UNet blocks: one resolution level each. `attentions` is None on levels without attention.


class DownBlock(nn.Module):
    """One level on the way down: (ResBlock, [SpatialTransformer]) × n, then an optional Downsample. Every
    output is kept as a skip connection for the way up."""

    def __init__(
        self,
        resnets: list[ResBlock],
        attentions: list[SpatialTransformer] | None,
        downsample: Downsample | None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.downsamplers = nn.ModuleList([downsample]) if downsample else None

    def forward(
        self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """h (B, C, H, W) -> (h', skips): h' (B, C', H', W') and the n (or n+1) maps to keep."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """The bottleneck: ResBlock, then (SpatialTransformer, ResBlock) per attention layer (none or one)."""

    def __init__(self, resnets: list[ResBlock], attentions: list[SpatialTransformer]) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        h = self.resnets[0](h, emb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            h = resnet(attention(h, context), emb)
        return h


class UpBlock(nn.Module):
    """One level on the way up: (concatenate a skip, ResBlock, [SpatialTransformer]) × (n+1), then an optional
    Upsample."""

    def __init__(
        self, resnets: list[ResBlock], attentions: list[SpatialTransformer] | None, upsample: Upsample | None
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.upsamplers = nn.ModuleList([upsample]) if upsample else None

    def forward(
        self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """h (B, C, H, W) and one skip per ResBlock, the last made first -> (B, C', H', W')."""
        for i, (resnet, skip) in enumerate(zip(self.resnets, skips)):
            h = resnet(torch.cat([h, skip], dim=1), emb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


# ------------------------------------------------------------------------------------------------------------
# Config


def _per_level(value: int | tuple[int, ...], levels: int, name: str) -> tuple[int, ...]:
    """An int (the same on every level) or one int per level -> one int per level."""
    if isinstance(value, int):
        return (value,) * levels
    if len(value) != levels:
        raise ValueError(
            f"{name}={value!r} has {len(value)} entries but block_out_channels has {levels} levels; "
            f"give one int for all levels or one per level"
        )
    return tuple(value)


@dataclass(frozen=True)
class UNetConfig:
    """Everything that shapes a `ConditionalUNet`. The defaults are Stable Diffusion 1.5's UNet.

    Stable Diffusion 2.x (768 px, v-prediction): `num_attention_heads=(5, 10, 20, 20)` (64-channel heads),
    `cross_attention_dim=1024`, `use_linear_projection=True`, `upcast_attention=True` (2.1), `sample_size=96`.

    Per-level values run from the highest resolution (level 0) down; the up path mirrors them. A head has
    channels // heads channels. Saved as diffusers' `config.json` (see `to_diffusers` / `from_diffusers`).
    """

    sample_size: int | None = 64  # latent H = W it was trained at (a default for pipelines, not enforced)
    in_channels: int = 4  # C_in of the latents
    out_channels: int = 4  # C_out of the prediction
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per level; levels = len(...)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # which levels have spatial transformers
    mid_block_attention: bool = True  # a spatial transformer in the bottleneck (UNetMidBlock2DCrossAttn)
    layers_per_block: int | tuple[int, ...] = 2  # ResBlocks per level going down (one more going up)
    transformer_layers_per_block: int | tuple[int, ...] = 1  # blocks per spatial transformer, per level
    num_attention_heads: int | tuple[int, ...] = 8  # heads per level (config.json: `attention_head_dim`)
    cross_attention_dim: int = 768  # width D of the text embeddings
    use_linear_projection: bool = False  # transformer projections: Linear (SD 2.x) or 1x1 conv (SD 1.x)
    upcast_attention: bool = False  # attention in float32 under float16/bfloat16 (SD 2.1)
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-5  # GroupNorm epsilon in ResBlocks and the output head
    flip_sin_to_cos: bool = True  # timestep embedding order [cos, sin] (SD) or [sin, cos]
    freq_shift: int = 0  # timestep embedding frequency shift (0 in SD; 1 in the DDPM code)
    dropout: float = 0.0  # ResBlock dropout
    position_embedding: bool = (
        False  # add a 2-D sine-cosine pixel position to the transformers' tokens (not SD)
    )

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # lists (JSON, YAML) -> tuples, so that configs compare equal
            if isinstance(getattr(self, field.name), list):
                object.__setattr__(self, field.name, tuple(getattr(self, field.name)))
        levels = len(self.block_out_channels)
        if levels < 1 or any(c < 1 for c in self.block_out_channels):
            raise ValueError(
                f"block_out_channels={self.block_out_channels!r} must be one positive int per level"
            )
        if len(self.attention_levels) != levels:
            raise ValueError(
                f"attention_levels={self.attention_levels!r} needs one bool per level ({levels} levels)"
            )
        for name in ("layers_per_block", "transformer_layers_per_block", "num_attention_heads"):
            if any(v < 1 for v in _per_level(getattr(self, name), levels, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be positive")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels={self.block_out_channels!r} must be divisible by "
                    f"norm_num_groups={self.norm_num_groups} (GroupNorm); change one of them"
                )
        for level, channels in enumerate(self.block_out_channels):
            heads = self.heads[level]
            has_attention = self.attention_levels[level] or (level == levels - 1 and self.mid_block_attention)
            if has_attention and heads > channels:
                raise ValueError(
                    f"num_attention_heads={heads} on level {level} exceeds its {channels} channels; "
                    f"use fewer heads"
                )

    # ---- per-level views ----
    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        return _per_level(self.num_attention_heads, self.levels, "num_attention_heads")

    @property
    def layers(self) -> tuple[int, ...]:
        return _per_level(self.layers_per_block, self.levels, "layers_per_block")

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return _per_level(self.transformer_layers_per_block, self.levels, "transformer_layers_per_block")

    @property
    def skip_channels(self) -> tuple[int, ...]:
        """Channels of every skip h_i, in the order the way down makes them (conv_in's first); a ControlNet's
        down-block residuals have these shapes."""
        channels = [self.block_out_channels[0]]
        for level, cout in enumerate(self.block_out_channels):
            channels += [cout] * (self.layers[level] + (level < self.levels - 1))
        return tuple(channels)

    @property
    def time_cond_proj_dim(self) -> None:
        """diffusers' pipelines read `unet.config.time_cond_proj_dim` (LCM's guidance embedding): none here."""
        return None

    # ---- diffusers' config.json (latentdiff.models.unet_diffusers) ----
    def to_diffusers(self) -> dict[str, Any]:
        """The `config.json` dict of the equivalent diffusers `UNet2DConditionModel`."""
        from latentdiff.models.unet_diffusers import config_to_diffusers

        return config_to_diffusers(self)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> UNetConfig:
        """Read a diffusers `UNet2DConditionModel` config dict; refuse what this UNet cannot express."""
        from latentdiff.models.unet_diffusers import config_from_diffusers

        return config_from_diffusers(config)


# ------------------------------------------------------------------------------------------------------------
# The encoder half (conv_in, time embedding, down blocks, middle): built and run once, shared by the UNet and
# the ControlNet (latentdiff.models.controlnet), whose trainable copy of it keeps the same parameter names.


def _resnet(c: UNetConfig, cin: int, cout: int) -> ResBlock:
    return ResBlock(cin, cout, 4 * c.block_out_channels[0], c.norm_num_groups, c.norm_eps, c.dropout)


def _transformer(c: UNetConfig, level: int) -> SpatialTransformer:
    return SpatialTransformer(
        c.block_out_channels[level],
        c.heads[level],
        c.cross_attention_dim,
        num_layers=c.transformer_layers[level],
        norm_groups=c.norm_num_groups,
        linear_projection=c.use_linear_projection,
        upcast=c.upcast_attention,
        position_embedding=c.position_embedding,
    )


def build_encoder(c: UNetConfig) -> tuple[nn.Conv2d, TimestepEmbedding, nn.ModuleList, MidBlock]:
    """conv_in, the timestep MLP, the down blocks and the middle block of a UNet of config `c`."""
    channels = c.block_out_channels
    down_blocks = nn.ModuleList()
    for level, cout in enumerate(channels):
        cin, n = channels[max(level - 1, 0)], c.layers[level]
        down_blocks.append(
            DownBlock(
                [_resnet(c, cin if i == 0 else cout, cout) for i in range(n)],
                [_transformer(c, level) for _ in range(n)] if c.attention_levels[level] else None,
                None if level == c.levels - 1 else Downsample(cout),
            )
        )
    mid_block = MidBlock(
        [_resnet(c, channels[-1], channels[-1]) for _ in range(1 + c.mid_block_attention)],
        [_transformer(c, c.levels - 1)] if c.mid_block_attention else [],
    )
    conv_in = nn.Conv2d(c.in_channels, channels[0], kernel_size=3, padding=1)
    return conv_in, TimestepEmbedding(channels[0], 4 * channels[0]), down_blocks, mid_block


class UNetEncoderMixin:
    """What the UNet and the ControlNet share: input checks, the timestep embedding e_t and the encoder pass.
    The class defines `config`, `time_embedding`, `down_blocks` and `mid_block` (from `build_encoder`)."""

    config: UNetConfig

    def _embed_time(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """e_t = MLP(sinusoid(t)), (B,) -> (B, 4·C_0)."""
        c = self.config
        t_emb = timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        return self.time_embedding(t_emb.to(dtype))

    def _encode(
        self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down blocks and the middle on h = conv_in(z_t) (B, C_0, H, W) -> (middle output, skips h_i)."""
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips += block_skips
        return self.mid_block(h, emb, context), skips

    def _check_inputs(
        self, sample: torch.Tensor, timestep: int | float | torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """Validate the inputs with errors that name the shapes; return the timesteps as a (B,) tensor."""
        c = self.config
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(
                f"sample has shape {tuple(sample.shape)}; expected (B, {c.in_channels}, H, W) "
                f"(in_channels={c.in_channels})"
            )
        batch, _, height, width = sample.shape
        factor = self.downsample_factor
        if height % factor or width % factor:
            raise ValueError(
                f"sample has spatial size {height}x{width}, which the {c.levels - 1} down-samplings cannot "
                f"halve evenly; H and W must be multiples of downsample_factor={factor} "
                f"(e.g. {max(factor, height // factor * factor)}x{max(factor, width // factor * factor)})"
            )
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != c.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; expected "
                f"(B, L, {c.cross_attention_dim}) (cross_attention_dim={c.cross_attention_dim})"
            )
        device_type = sample.device.type  # "meta" (shape and FLOP counting) has no autocast to ask about
        if device_type == "meta" or not torch.is_autocast_enabled(device_type):  # under autocast layers cast
            for name, tensor in (("sample", sample), ("encoder_hidden_states", encoder_hidden_states)):
                if tensor.dtype != self.dtype:
                    raise TypeError(
                        f"{name} is {tensor.dtype} but the UNet's weights are {self.dtype}; pass "
                        f"{name}.to({self.dtype}) (or cast the UNet with unet.to({tensor.dtype}))"
                    )
        if encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"encoder_hidden_states has batch {encoder_hidden_states.shape[0]} "
                f"(shape {tuple(encoder_hidden_states.shape)}) but sample has batch {batch} "
                f"(shape {tuple(sample.shape)}); repeat the text embeddings per sample"
            )
        if not torch.is_tensor(timestep):
            if not isinstance(timestep, numbers.Real):
                raise TypeError(f"timestep must be an int, float or tensor, got {type(timestep).__name__}")
            return torch.full((batch,), timestep, device=sample.device)
        if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, batch)):
            raise ValueError(
                f"timestep has shape {tuple(timestep.shape)}; expected a 0-d tensor, (1,) or ({batch},) "
                f"to match sample of shape {tuple(sample.shape)}"
            )
        return timestep.to(sample.device).reshape(-1).expand(batch)

    @property
    def downsample_factor(self) -> int:
        """How much the UNet shrinks H and W at its bottleneck: 2**(levels - 1)."""
        return 2 ** (self.config.levels - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResBlocks and transformer blocks in the backward pass instead of storing their
        activations (`torch.utils.checkpoint`, non-reentrant): less memory, about one more forward of
        compute."""
        for module in self.modules():
            if isinstance(module, ResBlock | TransformerBlock):
                module.gradient_checkpointing = enabled

    def disable_gradient_checkpointing(self) -> None:
        self.enable_gradient_checkpointing(False)


# ------------------------------------------------------------------------------------------------------------
# diffusers' call signature: the keyword arguments its pipelines pass, and its outputs


@dataclass
class UNetOutput:
    """`ConditionalUNet(..., return_dict=True)`: the prediction as `.sample` (diffusers' UNet2DConditionOutput)."""

    sample: torch.Tensor


def lora_scale(model: nn.Module, cross_attention_kwargs: dict[str, Any] | None) -> AbstractContextManager:
    """diffusers' `cross_attention_kwargs={"scale": s}`: every LoRA adapter of `model` multiplied by s for one
    call (s = 1 or no dict: unchanged). Other keys select diffusers' attention processors, which this model does
    not have: refused by name."""
    kwargs = dict(cross_attention_kwargs or {})
    scale = kwargs.pop("scale", 1.0)
    if kwargs:
        raise ValueError(
            f"cross_attention_kwargs has {sorted(kwargs)}; this model takes only 'scale' (the LoRA weight)"
        )
    if scale == 1.0:
        return nullcontext()
    from latentdiff.lora import scaled_adapters

    return scaled_adapters(model, float(scale))


def check_unused_kwargs(model_name: str, kwargs: dict[str, Any]) -> None:
    """diffusers' pipelines pass `timestep_cond`, `added_cond_kwargs`, `class_labels`, `attention_mask` (SDXL,
    LCM, IP-Adapter inputs); None or empty is accepted, anything else is refused by name."""
    unknown = sorted(k for k in kwargs if k not in _DIFFUSERS_UNUSED_KWARGS)
    if unknown:
        raise TypeError(f"{model_name}.forward got unexpected keyword arguments {unknown}")
    given = sorted(k for k, v in kwargs.items() if v is not None and not (isinstance(v, dict) and not v))
    if given:
        raise ValueError(
            f"{model_name} has no {', '.join(given)} input (SDXL/LCM/IP-Adapter conditioning); pass None"
        )


_DIFFUSERS_UNUSED_KWARGS = (
    "timestep_cond",
    "added_cond_kwargs",
    "class_labels",
    "attention_mask",
    "encoder_attention_mask",
)


def add_residuals(
    skips: list[torch.Tensor], down_residuals: Sequence[torch.Tensor] | None
) -> list[torch.Tensor]:
    """h_i + r_i for every skip (a ControlNet's down-block residuals r_i); the count and shapes must match."""
    if down_residuals is None:
        return skips
    if len(down_residuals) != len(skips):
        raise ValueError(
            f"down_block_additional_residuals has {len(down_residuals)} tensors but this UNet keeps "
            f"{len(skips)} skip connections; the ControlNet was made for another UNet shape "
            f"(block_out_channels and layers_per_block must match)"
        )
    for i, (skip, residual) in enumerate(zip(skips, down_residuals)):
        if residual.shape != skip.shape:
            raise ValueError(
                f"down_block_additional_residuals[{i}] has shape {tuple(residual.shape)} but the UNet's skip "
                f"{i} has {tuple(skip.shape)}; the ControlNet was made for another UNet shape or image size"
            )
    return [skip + residual for skip, residual in zip(skips, down_residuals)]


# ------------------------------------------------------------------------------------------------------------
# The UNet


class ConditionalUNet(UNetEncoderMixin, nn.Module):
    """ε_θ(z_t, t, τ_θ(y)): the text-conditional UNet of latent diffusion, with diffusers' parameter names.

    Layout (Ronneberger et al. 2015, with the ResBlocks and attention of Ho et al. 2020 and Rombach et al.
    2022): conv_in; per level going down, ResBlocks (+ spatial transformers) and a stride-2 conv; a middle
    ResBlock / transformer / ResBlock; per level going up, ResBlocks on [h, skip] (+ transformers) and a
    nearest upsample + conv; GroupNorm, SiLU, conv_out. The timestep embedding e_t enters every ResBlock; the
    text enters every transformer. A ControlNet's residuals (Zhang et al. 2023) are added to the skips and to
    the middle's output.

    Any dtype and device: move the model with `.to(...)`; the inputs' device and dtype are used as they come.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(
                f"config must be a UNetConfig, got {type(config).__name__}; for a diffusers config.json dict "
                f"use UNetConfig.from_diffusers(...)"
            )
        self.config = c = config
        self.conv_in, self.time_embedding, self.down_blocks, self.mid_block = build_encoder(c)

        self.up_blocks = nn.ModuleList()
        skip_channels = list(c.skip_channels)
        cin = c.block_out_channels[-1]
        for level in reversed(range(c.levels)):
            cout, n = c.block_out_channels[level], c.layers[level] + 1
            self.up_blocks.append(
                UpBlock(
                    [_resnet(c, (cin if i == 0 else cout) + skip_channels.pop(), cout) for i in range(n)],
                    [_transformer(c, level) for _ in range(n)] if c.attention_levels[level] else None,
                    Upsample(cout) if level > 0 else None,
                )
            )
            cin = cout

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, c.block_out_channels[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(c.block_out_channels[0], c.out_channels, kernel_size=3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: int | float | torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool | None = None,
        **diffusers_kwargs: Any,
    ) -> torch.Tensor | UNetOutput | tuple[torch.Tensor]:
        """Predict from noisy latents (this project's call `unet(z_t, t, context)`, or diffusers').

        Args:
            sample: z_t, (B, C_in, H, W), H and W divisible by `downsample_factor`.
            timestep: t as an int or float, a 0-d tensor, or a (B,) (or (1,)) tensor.
            encoder_hidden_states: text embeddings τ_θ(y), (B, L, cross_attention_dim).
            down_block_additional_residuals: a ControlNet's residuals, one per skip h_i, shaped like it.
            mid_block_additional_residual: a ControlNet's residual for the middle output (B, C_last, h, w).
            cross_attention_kwargs: diffusers' {"scale": s}: the LoRA adapters' weight for this call.
            return_dict: None (default) returns the tensor; True an output with `.sample`; False a 1-tuple
                (diffusers' conventions, for its pipelines).
            diffusers_kwargs: `timestep_cond`, `added_cond_kwargs`, ... as diffusers' pipelines pass them: None.
        Returns:
            (B, C_out, H, W), same dtype and device as `sample` (wrapped as `return_dict` says).
        """
        timesteps = self._check_inputs(sample, timestep, encoder_hidden_states)
        check_unused_kwargs(type(self).__name__, diffusers_kwargs)
        context = encoder_hidden_states
        with lora_scale(self, cross_attention_kwargs):
            emb = self._embed_time(timesteps, sample.dtype)  # e_t, (B, 4·C_0)
            h, skips = self._encode(self.conv_in(sample), emb, context)
            skips = add_residuals(skips, down_block_additional_residuals)
            if mid_block_additional_residual is not None:
                h = h + mid_block_additional_residual
            for block in self.up_blocks:
                h = block(h, [skips.pop() for _ in block.resnets], emb, context)
            out = self.conv_out(F.silu(self.conv_norm_out(h)))
        return out if return_dict is None else UNetOutput(out) if return_dict else (out,)

    # ---- files (diffusers' folder layout: latentdiff.models.unet_diffusers) ----
    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write `config.json` (diffusers' format) and `diffusion_pytorch_model.safetensors` into a folder."""
        from latentdiff.models.unet_diffusers import save_model

        save_model(self, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_path: str | Path, **kwargs: Any) -> ConditionalUNet:
        """Load a folder written by `save_pretrained` or by diffusers' `UNet2DConditionModel.save_pretrained`;
        keyword arguments as `latentdiff.models.unet_diffusers.load_unet` (subfolder, torch_dtype, allow_pickle,
        variant)."""
        from latentdiff.models.unet_diffusers import load_unet

        return load_unet(pretrained_model_path, **kwargs)


__all__ = ["ConditionalUNet", "UNetConfig", "UNetOutput", "build_encoder", "timestep_embedding"]
