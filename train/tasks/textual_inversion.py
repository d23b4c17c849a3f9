"""The textual inversion task (Gal et al. 2022; `latentdiff.textual_inversion` has the symbols): a new word S* for a
concept, learned as its token embedding(s) v* with the UNet, the VAE and the rest of the text encoder frozen.

What differs from text-to-image training (`train.tasks.t2i`; the loss, data and validation are its own):
- the config adds `--placeholder_token`, `--initializer_token`, `--num_vectors` (diffusers' names) and
  `--replace_word` (a word of the captions that S* stands for, so captioned data trains the new word);
- S* is added to the tokenizer (a word it already knows is refused), its rows start as the initializer's;
- the trained module is `PlaceholderEmbeddings`: v* alone, (N, D) float32. It replaces the embedding of S* in the
  text encoder's forward (a hook on the token embedding), so every other row of E is read, never written: they
  stay bit-identical, whatever the optimizer does;
- captions are encoded through the text encoder at every step (the cached text embeddings hold no v*);
- the export is `learned_embeds.safetensors`, `{S*: v*}` (diffusers' format): `pipe.load_textual_inversion(dir)`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from latentdiff import textual_inversion
from latentdiff.conditioning import encode_prompts
from train.loop import Trainer
from train.loop_config import ConfigError, flag
from train.tasks.t2i import TextToImageTask
from train.tasks.t2i_config import T2IConfig
from train.tasks.t2i_models import T2IModels

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextualInversionConfig(T2IConfig):
    """Every option of `train/train_textual_inversion.py`: those of `train_t2i.py` plus the new word's."""

    EXPORTED: ClassVar[tuple[str, ...]] = (
        textual_inversion.TEXT_INVERSION_WEIGHTS_NAME,
        textual_inversion.TEXT_INVERSION_WEIGHTS_NAME + ".partial",
    )

    placeholder_token: str | None = flag(
        None, "The new word S* the concept is learned as, e.g. '<star>'; it must be new to the tokenizer."
    )
    initializer_token: str | None = flag(
        None, "A word (one token) whose embedding v* starts from, e.g. a near concept: 'square'."
    )
    num_vectors: int = flag(
        1, "Vectors learned for S* (more vectors: more capacity; prompts expand S* to all).", at_least=1
    )
    replace_word: str | None = flag(
        None,
        "A word of the captions that S* stands for: every caption is read with it replaced by S* (e.g. star). "
        "Without it the captions must name S* themselves.",
    )
    output_dir: str = flag("textual_inversion", "Where checkpoints, logs and learned_embeds.safetensors go.")

    def check_combinations(self) -> None:
        super().check_combinations()
        if not self.placeholder_token or not self.initializer_token:
            raise ConfigError(
                "--placeholder_token and --initializer_token are required: the new word, e.g. '<star>', and a "
                "word its embedding starts from, e.g. 'square'."
            )
        for name in ("train_text_encoder", "inpainting"):
            if getattr(self, name):
                raise ConfigError(
                    f"--{name} trains more than the new word's embedding; textual inversion trains that alone "
                    "(use train_t2i.py or train_dreambooth.py)."
                )
        if self.text_encoder_init != "pretrained" or self.unet_config is not None:
            raise ConfigError(
                "textual inversion learns a word for a trained model: pass --pretrained_model_name_or_path, not "
                "--unet_config or --text_encoder_init random."
            )

    def caption(self, text: str) -> str:
        """The caption as trained: --replace_word replaced by S* (whole words only)."""
        if self.replace_word is None:
            return text
        return re.sub(rf"\b{re.escape(self.replace_word)}\b", self.placeholder_token, text)


class PlaceholderEmbeddings(nn.Module):
    """v*, the trained rows of the new tokens, (N, D) float32, read in place of E[token_ids] by a forward hook on
    the text encoder's token embedding (so E itself is never written).

    Args:
        text_encoder: the frozen text encoder, whose token embedding already has rows for `token_ids`.
        token_ids: (N,) ids of S*, S*_1, ...; v* starts from their current rows.
    """

    def __init__(self, text_encoder: nn.Module, token_ids: list[int]) -> None:
        super().__init__()
        embedding = text_encoder.get_input_embeddings()
        self.vectors = nn.Parameter(embedding.weight[token_ids].detach().float().clone())
        self.register_buffer("token_ids", torch.tensor(token_ids), persistent=False)
        self._hook = embedding.register_forward_hook(self._substitute)

    def _substitute(
        self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        """E[ids] with the rows of S* taken from v*; ids (B, L) -> (B, L, D)."""
        hits = args[0][..., None] == self.token_ids.to(args[0].device)  # (B, L, N)
        learned = (
            hits.to(self.vectors.dtype) @ self.vectors
        )  # (B, L, D): v*_n where token n is, else 0 (a batch
        # without S* still depends on v*, with gradient 0: the loop needs a loss with a graph)
        return torch.where(hits.any(-1, keepdim=True), learned.to(output.dtype), output)

    def remove(self) -> None:
        """Detach the hook: the text encoder reads E again."""
        self._hook.remove()


def add_placeholder(
    cfg: TextualInversionConfig, models: T2IModels, weight_dtype: torch.dtype
) -> PlaceholderEmbeddings:
    """Freeze the UNet, add S* (initialised from --initializer_token) to the tokenizer and text encoder, and return
    the module the loop trains: v*."""
    models.unet.requires_grad_(False)
    models.unet.to(dtype=weight_dtype)
    try:
        start = textual_inversion.initializer_vector(
            models.tokenizer, models.text_encoder, cfg.initializer_token
        )
        ids = textual_inversion.add_tokens(
            models.tokenizer, models.text_encoder, cfg.placeholder_token, start.expand(cfg.num_vectors, -1)
        )
    except ValueError as error:
        raise ConfigError(f"--placeholder_token/--initializer_token: {error}") from None
    models.text_encoder.requires_grad_(False)
    logger.info(
        "textual inversion: %s (%d vector(s) of %d, ids %s) from %r",
        cfg.placeholder_token,
        cfg.num_vectors,
        start.numel(),
        ids,
        cfg.initializer_token,
    )
    return PlaceholderEmbeddings(models.text_encoder, ids)


class TextualInversionTask(TextToImageTask):
    """`TextToImageTask` training v* only: captions read with S*, encoded through the hooked text encoder."""

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], rng) -> torch.Tensor:
        """The text-to-image loss with the frozen UNet; v* (`model`, read by the hook) gets the gradient."""
        frozen = nn.ModuleDict({"unet": self.models.unet})  # no trained text encoder: ∅ stays the cached one
        return super().compute_loss(frozen, batch, rng)

    def _prompt_embeds(self, batch: dict[str, Any], trained_text_encoder: nn.Module | None) -> torch.Tensor:
        captions = [self.cfg.caption(text) for text in batch["captions"]]
        return encode_prompts(self.models.tokenizer, self.models.text_encoder, captions, self.device)

    def validation_images(self, unet: nn.Module, text_encoder: nn.Module | None = None):
        return super().validation_images(self.models.unet)

    def attach_holdout(self, holdout, collate) -> None:
        super().attach_holdout(holdout, collate)
        if self._holdout_batch is not None:  # read with S*, encoded at each validation (v* changes)
            self._holdout_batch["captions"] = [self.cfg.caption(c) for c in self._holdout_batch["captions"]]

    def validation_loss(self, unet: nn.Module, text_encoder: nn.Module | None = None) -> float:
        return super().validation_loss(self.models.unet, self.models.text_encoder)

    def export(self, trainer: Trainer) -> Path:
        """Write `learned_embeds.safetensors` ({S*: v*}, EMA weights if --use_ema) into --output_dir."""
        path = Path(self.cfg.output_dir) / textual_inversion.TEXT_INVERSION_WEIGHTS_NAME
        if self.accelerator.is_main_process:
            with trainer.averaged_weights() as model:
                path = textual_inversion.save_textual_inversion(
                    self.cfg.output_dir, self.cfg.placeholder_token, model.vectors
                )
            logger.info("saved the learned embedding of %s to %s", self.cfg.placeholder_token, path)
        self.accelerator.wait_for_everyone()
        return path
