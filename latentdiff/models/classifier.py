"""A noise-aware classifier p_φ(y | x_t, t) on latents, for classifier guidance (Dhariwal & Nichol 2021, §4).

It sees a noisy latent x_t (the model input at timestep t) and predicts one or more labels of the clean scene, e.g.
the colour, the shape and the grid cell of a single object: one softmax head per label ("attribute"). Guidance
needs log p_φ(y | x_t) for a chosen y, summed over the heads, and its gradient with respect to x_t.

Architecture (guided-diffusion's classifier is the UNet's encoder half with an attention-pool head; this is a
smaller version of the same idea, reusing the UNet's blocks):

    e_t = TimestepEmbedding(timestep_embedding(t))                      (B, E)
    h = conv_in(x_t)                                                    (B, C, h, w)
    per level: ResBlock(h, e_t) × layers_per_block, then Downsample (not after the last)
    pooled = mean over H, W of SiLU(GroupNorm(h))                       (B, C_last)
    logits[a] = Linear_a(pooled)                                        (B, K_a) per attribute a

| code name                 | symbol                | meaning                                                   |
|---------------------------|-----------------------|-----------------------------------------------------------|
| ``attributes``            | a, K_a                | the labels the classifier predicts and their class counts |
| ``log_prob(x_t, t, y)``   | log p_φ(y | x_t)      | Σ_a log softmax(logits[a])[y_a], shape (B,)               |
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from latentdiff.models.unet import Downsample, ResBlock, TimestepEmbedding, timestep_embedding

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    """The classifier's shape; ``attributes`` names each head and its class count."""

    attributes: tuple[tuple[str, int], ...] = (("color", 8), ("shape", 4), ("cell", 9))  # (name, K_a)
    in_channels: int = 4  # latent channels
    block_out_channels: tuple[int, ...] = (32, 64)  # C per level; the latent side halves between levels
    layers_per_block: int = 1
    norm_groups: int = 8
    time_embed_dim: int = 128  # E

    def __post_init__(self) -> None:
        attributes = tuple((str(name), int(count)) for name, count in self.attributes)
        object.__setattr__(self, "attributes", attributes)
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        names = [name for name, _ in attributes]
        if not attributes or len(set(names)) != len(names) or any(count < 2 for _, count in attributes):
            raise ValueError(
                f"attributes={attributes!r} must name at least one label, each once, with >= 2 classes, e.g. "
                "(('color', 8), ('shape', 4))."
            )


class NoiseAwareClassifier(nn.Module):
    """p_φ(y | x_t, t) with one softmax head per attribute (module docstring)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        channels = c.block_out_channels
        self.time_embedding = TimestepEmbedding(channels[0], c.time_embed_dim)
        self.conv_in = nn.Conv2d(c.in_channels, channels[0], kernel_size=3, padding=1)
        layers: list[nn.Module] = []
        previous = channels[0]
        for level, width in enumerate(channels):
            for _ in range(c.layers_per_block):
                layers.append(ResBlock(previous, width, c.time_embed_dim, c.norm_groups, 1e-5, 0.0))
                previous = width
            if level < len(channels) - 1:
                layers.append(Downsample(width))
        self.layers = nn.ModuleList(layers)
        self.norm_out = nn.GroupNorm(c.norm_groups, previous)
        self.heads = nn.ModuleDict({name: nn.Linear(previous, count) for name, count in c.attributes})

    def forward(self, sample: Tensor, timestep: Tensor | float) -> dict[str, Tensor]:
        """Logits per attribute.

        Args:
            sample: x_t, (B, C, h, w), the latent the denoiser sees at timestep t (VAE-scaled, noised).
            timestep: t, a number or a (B,) tensor (fractional timesteps are fine).

        Returns:
            {attribute: logits (B, K_a)}.
        """
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype))
        h = self.conv_in(sample)
        for layer in self.layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        pooled = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # (B, C_last)
        return {name: head(pooled) for name, head in self.heads.items()}

    def log_prob(self, sample: Tensor, timestep: Tensor | float, labels: dict[str, Tensor]) -> Tensor:
        """log p_φ(y | x_t) = Σ_a log softmax(logits[a])[y_a], shape (B,); ``labels`` maps each attribute to (B,)."""
        logits = self(sample, timestep)
        return sum(
            F.log_softmax(logits[name].float(), dim=-1).gather(1, labels[name].reshape(-1, 1)).squeeze(1)
            for name in logits
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- files ----
    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into a folder."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> NoiseAwareClassifier:
        """Load a folder written by :meth:`save_pretrained`; the model in eval mode on the CPU."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{directory} needs {CONFIG_NAME} and {WEIGHTS_NAME} (written by NoiseAwareClassifier.save_pretrained)."
            )
        model = cls(ClassifierConfig(**json.loads((directory / CONFIG_NAME).read_text())))
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)), strict=True)
        return model.eval()
