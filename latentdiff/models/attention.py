"""Attention for the UNet: the one attention layer, the GEGLU feed-forward, the transformer block, the spatial
transformer. Read leaf-first; `latentdiff.models.unet` builds on these.

Symbols (Vaswani et al. 2017, "Attention is all you need", eq. 1; Rombach et al. 2022, "High-resolution image
synthesis with latent diffusion models", sec. 3.3):

| code name              | symbol        | meaning                                                        |
|------------------------|---------------|----------------------------------------------------------------|
| `hidden_states`        | z             | image tokens, (B, N, C) with N = H·W                           |
| `context`              | τ_θ(y)        | text embeddings, (B, L, D); D = cross-attention width          |
| `to_q`, `to_k`, `to_v` | W_Q, W_K, W_V | projections; keys and values come from `context` in cross-attn |
| `to_out.0`             | W_O           | output projection                                              |
| `heads`, `head_dim`    | h, d_k        | softmax(Q Kᵀ / √d_k) V is computed per head                    |

Parameter names are those of diffusers' `UNet2DConditionModel` (`attn1.to_q`, `ff.net.0.proj`, `proj_in`,
...), so Stable Diffusion weights and diffusers-format LoRA files load without conversion, and `to_q`, `to_k`,
`to_v`, `to_out.0` stay plain `nn.Linear` layers that peft can wrap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

_HALF_DTYPES = (torch.float16, torch.bfloat16)


class Attention(nn.Module):
    """Multi-head attention, self- (``context=None``) or cross-attention, through
    `torch.nn.functional.scaled_dot_product_attention`.

    Args:
        query_dim: width C of the image tokens.
        heads: number of heads h.
        head_dim: width d_k of one head; the inner width is h·d_k.
        context_dim: width D of the context tokens for cross-attention; None for self-attention.
        upcast: compute softmax(Q Kᵀ / √d_k) V in float32 when the inputs are float16/bfloat16 (Stable
            Diffusion 2.1 needs it in float16, where Q Kᵀ overflows); no effect in float32. (diffusers'
            SDPA processor ignores this flag.)
        dropout: dropout on the output projection (0 in Stable Diffusion).
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        upcast: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * head_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        # A list so that the projection is named `to_out.0` as in diffusers and LDM (`to_out.1`: dropout).
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(dropout)])

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (B, N, C), context (B, L, D) or None -> (B, N, C)."""
        context = hidden_states if context is None else context
        query, key, value = self.to_q(hidden_states), self.to_k(context), self.to_v(context)
        # (B, N, h·d_k) -> (B, h, N, d_k): a view, no copy; SDPA takes the strided layout as it is.
        query, key, value = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (query, key, value))
        dtype = query.dtype
        if self.upcast and dtype in _HALF_DTYPES:
            query, key, value = query.float(), key.float(), value.float()
        attended = F.scaled_dot_product_attention(query, key, value)  # softmax(Q Kᵀ / √d_k) V, (B, h, N, d_k)
        # (B, h, N, d_k) -> (B, N, h·d_k): a view, as SDPA stores its output (B, N, h, d_k)-contiguous.
        attended = attended.transpose(1, 2).flatten(2).to(dtype)
        return self.to_out[1](self.to_out[0](attended))


class _GatedGELU(torch.autograd.Function):
    """[value | gate] -> value ⊙ GELU(gate), keeping only the projection for the backward pass: GELU(gate) is
    recomputed there instead of stored, which saves a quarter of the feed-forward's activation memory (4C of
    the 16C per token that autograd would keep)."""

    @staticmethod
    def forward(ctx, projection: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(projection)
        value, gate = projection.chunk(2, dim=-1)
        return value * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (projection,) = ctx.saved_tensors
        value, gate = projection.chunk(2, dim=-1)
        grad_value = grad * F.gelu(gate)  # ∂/∂value = GELU(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad * value, gate)  # ∂/∂gate = value ⊙ GELU'(gate)
        return torch.cat([grad_value, grad_gate], dim=-1)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020, "GLU variants improve transformer", eq. 6): x W ⊙ GELU(x V).
    `proj` holds [W | V] side by side, as in diffusers and LDM."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., dim_in) -> (..., dim_out)."""
        return _GatedGELU.apply(self.proj(hidden_states))


class FeedForward(nn.Module):
    """GEGLU feed-forward, 4x inner width: `net.0` (GEGLU), `net.1` (dropout), `net.2` (output Linear)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        return self.net(hidden_states)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention over the text, GEGLU feed-forward, each
    with a residual connection (LDM's `BasicTransformerBlock`). LayerNorm eps is 1e-5, as in Stable Diffusion.

    Args:
        dim: width C of the image tokens.
        heads, head_dim: attention heads h and head width d_k.
        context_dim: width D of the text embeddings.
        upcast: see `Attention`.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """hidden_states (B, N, C), context (B, L, D) -> (B, N, C)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, hidden_states, context, use_reentrant=False)
        return self._forward(hidden_states, context)

    def _forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        hidden_states = self.attn1(self.norm1(hidden_states)) + hidden_states
        hidden_states = self.attn2(self.norm2(hidden_states), context) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


def sincos_position_embedding(
    height: int, width: int, dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(1, H·W, dim) fixed embedding of pixel (row, column), rows first: the first dim/2 channels encode the row,
    the rest the column, each as [sin(p·ω_k), cos(p·ω_k)] with ω_k = 10000^(−k/(dim/4)), k < dim/4 (MAE's 2-D
    sine-cosine embedding). Positions are in units of the map's side (p = index / side · 16), so a pixel's
    embedding depends on where it lies in the image, not on the resolution. dim must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"position embedding width {dim} must be a multiple of 4")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)

    def encode(positions: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, dim/2)
        angles = positions[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows = encode((torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height * 16)
    cols = encode((torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width * 16)
    grid = torch.cat(
        [rows[:, None].expand(height, width, -1), cols[None].expand(height, width, -1)], dim=-1
    )  # (H, W, dim)
    return grid.reshape(1, height * width, dim).to(dtype)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map (LDM's `SpatialTransformer`, diffusers'
    `Transformer2DModel`): GroupNorm (eps 1e-6), projection in, `num_layers` transformer blocks, projection
    out, residual connection.

    Args:
        channels: channels C of the feature map.
        heads: attention heads h; each head has C // h channels.
        context_dim: width D of the text embeddings.
        num_layers: transformer blocks in sequence.
        norm_groups: GroupNorm groups.
        linear_projection: project in and out with `nn.Linear` on the tokens (Stable Diffusion 2.x) instead
            of a 1x1 `nn.Conv2d` on the map (Stable Diffusion 1.x): the same map, another weight shape.
        upcast: see `Attention`.
        position_embedding: add a fixed 2-D sine-cosine embedding of each pixel's (row, column) to the tokens
            before the blocks (as DiT and MAE do), so that attention can tell where a pixel is; without it only
            the convolutions' zero padding tells. No weights; off in every Stable Diffusion layout.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        num_layers: int = 1,
        norm_groups: int = 32,
        linear_projection: bool = False,
        upcast: bool = False,
        position_embedding: bool = False,
    ) -> None:
        super().__init__()
        head_dim = channels // heads
        inner_dim = heads * head_dim
        self.linear_projection = linear_projection
        self.position_embedding = position_embedding
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in = nn.Linear(channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner_dim, heads, head_dim, context_dim, upcast) for _ in range(num_layers)
        )

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """hidden_states (B, C, H, W), context (B, L, D) -> (B, C, H, W)."""
        height, width = hidden_states.shape[-2:]
        normed = self.norm(hidden_states)
        # (B, C, H, W) -> (B, H·W, C): a copy, unless the map is channels-last.
        if self.linear_projection:
            tokens = self.proj_in(normed.permute(0, 2, 3, 1).flatten(1, 2))
        else:
            tokens = self.proj_in(normed).permute(0, 2, 3, 1).flatten(1, 2)
        if self.position_embedding:
            tokens = tokens + sincos_position_embedding(
                height, width, tokens.shape[-1], tokens.device, tokens.dtype
            )
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        # (B, H·W, C) -> (B, C, H, W): a view with channels-last strides, which convolutions take as it is.
        if self.linear_projection:
            update = self.proj_out(tokens).unflatten(1, (height, width)).permute(0, 3, 1, 2)
        else:
            update = self.proj_out(tokens.unflatten(1, (height, width)).permute(0, 3, 1, 2))
        return hidden_states + update
