"""An exponential moving average of the trained weights (Polyak averaging), saved with each checkpoint."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn


class EMA:
    """Exponential moving average of the trainable parameters (float32 copies).

    θ̄ ← d_n·θ̄ + (1 − d_n)·θ at update n = 0, 1, …, with d_0 = 0 (the first update copies θ) and
    d_n = min(decay, (1 + n)/(10 + n)) afterwards: diffusers' `EMAModel` schedule without its power warm-up, so a
    young average follows the weights instead of staying at their random start.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = {
            name: p.detach().to(torch.float32).clone()
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    def current_decay(self) -> float:
        n = self.num_updates
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().to(torch.float32), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model`'s parameters (cast to their dtype)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Use the averaged weights inside the block, the trained ones again after it."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in backup:
                        p.copy_(backup[name])

    def save(self, path: Path) -> None:
        save_file(
            {name: t.contiguous() for name, t in self.shadow.items()},
            str(path),
            metadata={"num_updates": str(self.num_updates), "decay": repr(self.decay)},
        )

    def load(self, path: Path) -> None:
        tensors = load_file(str(path))
        missing = sorted(set(self.shadow) - set(tensors))
        if missing:
            raise ValueError(f"{path} lacks EMA weights for {len(missing)} parameters, e.g. {missing[:3]}")
        for name in self.shadow:
            self.shadow[name] = tensors[name].to(self.shadow[name].device)
        with safe_open(str(path), framework="pt") as f:
            self.num_updates = int(f.metadata()["num_updates"])
