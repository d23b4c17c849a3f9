"""LoRA adapters on a pipeline: load several, weight them, fuse and unfuse, disable and enable, unload.

`LoraMixin` works on the pipeline's `self.unet` and, when an adapter file has text-encoder weights, its
`self.text_encoder`; the adapter mechanics and the file formats are `latentdiff.lora`'s. The calls and their meaning
are diffusers' (`StableDiffusionPipeline.load_lora_weights` ...):

    pipe.load_lora_weights("out/lora-star", scale=0.8)            # adapter "default_0", applied with weight 0.8
    pipe.load_lora_weights("other.safetensors", adapter_name="b")  # now both apply: W₀x + 0.8·Δ₀x + 1.0·Δ_b x
    pipe.set_adapters(["default_0", "b"], [0.5, 1.0])              # re-weight (adapters left out are not applied)
    pipe.fuse_lora(); pipe.unfuse_lora()                           # merge into W₀ (no per-step cost) and back
    pipe.disable_lora(); pipe.enable_lora()                        # the base model for a while
    pipe.unload_lora_weights()                                     # the very model from before the first load

The state (which adapters, their weights, fused or not) lives in the modules themselves, so it stays right whatever
else touches them.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence

from torch import nn

from latentdiff import lora
from latentdiff.validation import check_finite

logger = logging.getLogger(__name__)


class LoraMixin:
    """LoRA methods for a pipeline that has a `unet` attribute and optionally a `text_encoder` attribute."""

    unet: nn.Module
    text_encoder: nn.Module | None

    def _lora_models(self) -> dict[str, nn.Module]:
        """The pipeline's parts that adapters can live in, by file component name."""
        parts = {"unet": self.unet}
        if getattr(self, "text_encoder", None) is not None:
            parts["text_encoder"] = self.text_encoder
        return parts

    def _adapter_weights(self) -> dict[str, float]:
        """Every loaded adapter and its current weight s, in load order."""
        weights: dict[str, float] = {}
        for model in self._lora_models().values():
            for name, weight in lora.adapter_weights(model).items():
                weights.setdefault(name, weight)
        return weights

    def _check_unfused(self, call: str) -> None:
        if any(lora.is_fused(model) for model in self._lora_models().values()):
            raise ValueError(
                f"{call} needs unfused adapters: call unfuse_lora() first (the fused weights hold the "
                "adapters at the weights they had when fused)."
            )

    def get_active_adapters(self) -> list[str]:
        """Names of the adapters applied now, in load order (empty when none, or after disable_lora())."""
        return self._active() if self._lora_enabled() else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Loaded adapters per part, e.g. {"unet": ["default_0"], "text_encoder": ["default_0"]}."""
        return {part: lora.adapter_names(model) for part, model in self._lora_models().items()}

    def _lora_enabled(self) -> bool:
        return all(lora.is_enabled(model) for model in self._lora_models().values())

    def load_lora_weights(
        self, path: str | os.PathLike, adapter_name: str | None = None, scale: float = 1.0
    ) -> str:
        """Load an adapter and apply it, together with the adapters already applied.

        Args:
            path: a folder holding `pytorch_lora_weights.safetensors` (what `train/train_lora.py` and diffusers'
                LoRA scripts write) or a `.safetensors` file; diffusers, peft, older diffusers and kohya key formats
                load (see `latentdiff.lora`).
            adapter_name: its name for `set_adapters`; default `default_<n>` with n the number already loaded.
            scale: its weight s (0: no effect, 1: as trained); `set_adapters` changes it later.
        Returns:
            The adapter's name.
        Raises:
            FileNotFoundError: no adapter file at `path`.
            ValueError: a layer of the adapter that the model lacks or whose shape differs (named in the message;
                the pipeline is left unchanged), a name already in use, or fused adapters.
        """
        check_finite("scale", scale, "0.8 (the adapter's weight)")
        parts = lora.read_lora_file(path)
        models = self._lora_models()
        if "text_encoder" in parts and "text_encoder" not in models:
            raise ValueError(
                f"the adapter at {str(path)!r} has text-encoder weights but the pipeline has no text_encoder."
            )
        self._check_unfused("load_lora_weights")
        loaded = self._adapter_weights()
        if adapter_name is None:
            adapter_name = f"default_{len(loaded)}"
            while adapter_name in loaded:
                adapter_name += "_"
        elif adapter_name in loaded:
            raise ValueError(
                f"adapter_name={adapter_name!r} is already loaded (loaded: {list(loaded)}); choose another name or "
                "unload_lora_weights() first."
            )
        enabled = self._lora_enabled()
        active = self._active()
        # Check every part against its model before changing any, so a bad file leaves the pipeline as it was.
        fitted = {
            part: lora.fit_lora(models[part], weights, part.replace("_", " "))
            for part, weights in parts.items()
        }
        for part, weights in fitted.items():
            lora.load_lora(models[part], weights, adapter_name, part.replace("_", " "))
        names = [*active, adapter_name]
        self._apply(names, [loaded[name] for name in active] + [float(scale)])
        if not enabled:
            for model in models.values():
                lora.enable_adapters(model, False)
        logger.info(
            "loaded LoRA adapter %r from %s (%s) with weight %s",
            adapter_name,
            path,
            " and ".join(parts),
            scale,
        )
        return adapter_name

    def _active(self) -> list[str]:
        """The adapters set to apply, in load order, whether or not adapters are disabled right now."""
        active: dict[str, None] = {}
        for model in self._lora_models().values():
            active.update(dict.fromkeys(lora.active_adapters(model)))
        return [name for name in self._adapter_weights() if name in active]

    def _apply(self, names: list[str], weights: list[float]) -> None:
        for model in self._lora_models().values():
            lora.set_active_adapters(model, names, weights)

    def set_adapters(
        self, names: str | Sequence[str], weights: float | Sequence[float] | None = None
    ) -> None:
        """Apply exactly these adapters with these weights: W₀x + Σ_i s_i·Δ_i x; loaded adapters not named are kept
        but not applied.

        Args:
            names: an adapter name or a list of them (as returned by `load_lora_weights`).
            weights: one weight per name, one weight for all, or None (1.0 each).
        """
        names = [names] if isinstance(names, str) else list(names)
        loaded = self._adapter_weights()
        unknown = [name for name in names if name not in loaded]
        if unknown:
            raise ValueError(f"set_adapters: no adapter named {unknown}; loaded: {list(loaded)}.")
        if weights is None:
            weights = [1.0] * len(names)
        elif isinstance(weights, numbers.Real):
            weights = [float(weights)] * len(names)
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(
                f"set_adapters got {len(names)} names but {len(weights)} weights; give one per name."
            )
        for name, weight in zip(names, weights):
            check_finite(f"the weight of adapter {name!r}", weight, "0.8")
        self._check_unfused("set_adapters")
        self._apply(names, [float(w) for w in weights])

    def fuse_lora(self) -> None:
        """Merge the applied adapters, at their weights, into the base weights (W₀ ← W₀ + Σ s_i Δ_i): the same
        outputs, no extra cost per step. `unfuse_lora()` takes them out again."""
        for model in self._lora_models().values():
            lora.fuse_adapters(model)

    def unfuse_lora(self) -> None:
        """Subtract the fused adapters from the base weights (the base weights come back up to float rounding)."""
        for model in self._lora_models().values():
            lora.unfuse_adapters(model)

    def disable_lora(self) -> None:
        """Run the base model (fused adapters are unfused first) until `enable_lora()`; nothing is unloaded."""
        for model in self._lora_models().values():
            lora.unfuse_adapters(model)
            lora.enable_adapters(model, False)

    def enable_lora(self) -> None:
        """Apply the adapters again, with the weights they had."""
        for model in self._lora_models().values():
            lora.enable_adapters(model, True)

    def unload_lora_weights(self) -> None:
        """Remove every adapter: the UNet and text encoder are again the modules they were before loading, with the
        same parameters and values (bit-identical outputs). Fused adapters stay in the weights, as in diffusers
        (fuse_lora() then unload_lora_weights() bakes an adapter in); call unfuse_lora() first to drop them."""
        for model in self._lora_models().values():
            if lora.is_fused(model):
                logger.info("unloading fused LoRA adapters: their update stays in the weights")
            lora.remove_adapters(model)
