"""The contrastive text-image task: train a small `transformers.CLIPModel` (Radford et al. 2021) through the one
training loop (`train.loop`), for `train_clip.py`; its text tower then conditions the diffusion model.

For a batch of B image-caption pairs, with L2-normalised image and text embeddings u_i, v_j and the learned
temperature τ (`logit_scale` = log 1/τ):

    logits_ij = u_i · v_j / τ
    loss = ½ (CE(logits, diag) + CE(logitsᵀ, diag))        (Radford et al. 2021, fig. 3)

Each caption is matched against the other B − 1 of its batch, so the text tower must encode every attribute that
tells captions apart (here colour, shape, size, position, background). The export writes the text tower as
`text_encoder/` (a `CLIPTextModel`) and the tokenizer as `tokenizer/`: the layout `train_t2i.py
--pretrained_text_encoder_name_or_path` and Stable Diffusion folders use.

Without --tokenizer_name_or_path a word-level CLIP tokenizer is built from the words of the training captions
(plus --tokenizer_extra_words, e.g. a word reserved for a later LoRA), so that every caption word is one token.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from torch import nn

from latentdiff.data.dataset import TextImageDataset, captions_of, collate_text_image
from latentdiff.data.tokenizer import build_word_tokenizer
from train.arguments import read_mapping
from train.data import split_image_datasets
from train.loop import Trainer
from train.loop_config import ConfigError, LoopConfig, flag
from train.randomness import BatchRandom

logger = logging.getLogger(__name__)

CLIP_FOLDER = "clip"  # the whole CLIPModel, inside --output_dir (text_encoder/ and tokenizer/ beside it)
TOKENIZER_SOURCE_FOLDER = "tokenizer-source"  # the word tokenizer built from the captions
WORD = re.compile(r"[a-z]+|[^\sa-z]")


@dataclasses.dataclass(frozen=True)
class ClipConfig(LoopConfig):
    """Every option of `train/train_clip.py`: the loop's flags plus CLIP's."""

    EXPORTED: ClassVar[tuple[str, ...]] = (CLIP_FOLDER, "text_encoder", "tokenizer", TOKENIZER_SOURCE_FOLDER)

    clip_config: str | None = flag(
        None,
        "JSON file of a transformers CLIPConfig ({'text_config': {...}, 'vision_config': {...}, 'projection_dim': "
        "N}): train a CLIP model of this shape from scratch. vocab_size and the special token ids are taken from "
        "the tokenizer, image_size from --resolution.",
        exists="file",
    )
    tokenizer_name_or_path: str | None = flag(
        None,
        "Folder of a CLIP tokenizer; default: build a word-level one from the training captions.",
        exists="folder",
    )
    tokenizer_extra_words: list[str] | None = flag(
        None, "Words added to a built vocabulary though no training caption uses them (e.g. star)."
    )
    max_text_length: int = flag(
        77, "Tokens per caption (padding and truncation length, start and end included).", at_least=3
    )

    def check_combinations(self) -> None:
        super().check_combinations()
        if self.clip_config is None:
            raise ConfigError(
                "--clip_config is missing: pass a CLIPConfig JSON file (the shape of the new model)."
            )


def caption_words(dataset, caption_column: str) -> list[str]:
    """Every word and punctuation mark of the dataset's captions, in first-seen order."""
    words: dict[str, None] = {}
    for value in dataset[caption_column]:
        for caption in captions_of(value):
            words.update(dict.fromkeys(WORD.findall(caption.lower())))
    return list(words)


def build_tokenizer(cfg: ClipConfig, dataset):
    """The run's CLIPTokenizer: --tokenizer_name_or_path, or a word tokenizer of the captions' words."""
    from transformers import CLIPTokenizer

    if cfg.tokenizer_name_or_path is not None:
        return CLIPTokenizer.from_pretrained(cfg.tokenizer_name_or_path, model_max_length=cfg.max_text_length)
    words = caption_words(dataset, cfg.caption_column) + list(cfg.tokenizer_extra_words or [])
    logger.info("built a word-level tokenizer of %d words from the captions", len(words))
    return build_word_tokenizer(Path(cfg.output_dir) / TOKENIZER_SOURCE_FOLDER, words, cfg.max_text_length)


def build_clip(cfg: ClipConfig, tokenizer) -> nn.Module:
    """A new CLIPModel of --clip_config's shape, sized to the tokenizer and the resolution."""
    from transformers import CLIPConfig, CLIPModel

    values = read_mapping(cfg.clip_config, "--clip_config")
    text = {
        **values.get("text_config", {}),
        "vocab_size": len(tokenizer),
        "max_position_embeddings": cfg.max_text_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {**values.get("vision_config", {}), "image_size": cfg.resolution}
    if cfg.resolution % vision.get("patch_size", 32):
        raise ConfigError(
            f"--resolution={cfg.resolution} is not divisible by the vision tower's patch_size {vision['patch_size']}."
        )
    rest = {k: v for k, v in values.items() if k not in ("text_config", "vision_config")}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, **rest)).float().train()


class ClipTask:
    """Data, loss, validation and export of contrastive training."""

    def __init__(self, cfg: ClipConfig, clip: nn.Module, tokenizer, accelerator: Accelerator, seed: int):
        self.cfg = cfg
        self.clip = clip
        self.tokenizer = tokenizer
        self.accelerator = accelerator
        self.seed = seed
        self.holdout: dict[str, Any] | None = None

    def datasets(self, dataset) -> tuple[TextImageDataset, Any]:
        """(training dataset, collate); the last --validation_holdout rows are held out for validation."""
        train, held = split_image_datasets(self.cfg, dataset, self.seed)
        if held is not None:
            self.holdout = collate_text_image([held[i] for i in range(len(held))])
        return train, collate_text_image

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=self.cfg.max_text_length,
            return_tensors="pt",
        ).input_ids.to(self.accelerator.device)

    def compute_loss(self, clip: nn.Module, batch: dict[str, Any], rng: BatchRandom) -> torch.Tensor:
        pixels = batch["pixel_values"].to(self.accelerator.device)
        return clip(input_ids=self._tokens(batch["captions"]), pixel_values=pixels, return_loss=True).loss

    @torch.no_grad()
    def validate(self, trainer: Trainer, step: int) -> dict[str, float]:
        """Held-out top-1 retrieval accuracy, image -> caption and caption -> image, among the held-out pairs."""
        logs: dict[str, float] = {}
        if self.accelerator.is_main_process and self.holdout is not None:
            clip = trainer.model
            clip.eval()
            with trainer.averaged_weights():
                out = clip(
                    input_ids=self._tokens(self.holdout["captions"]),
                    pixel_values=self.holdout["pixel_values"].to(self.accelerator.device),
                )
            clip.train()
            # Captions repeat (short ones especially): a retrieval counts when the caption is the same text.
            captions = self.holdout["captions"]
            same = torch.tensor(
                [[a == b for b in captions] for a in captions], device=out.logits_per_image.device
            )
            rows = torch.arange(len(captions))
            logs["val_image_to_text"] = float(same[rows, out.logits_per_image.argmax(1)].float().mean())
            logs["val_text_to_image"] = float(same[rows, out.logits_per_text.argmax(1)].float().mean())
        self.accelerator.wait_for_everyone()
        return logs

    def export(self, trainer: Trainer) -> Path:
        """Write --output_dir/clip (the CLIPModel), --output_dir/text_encoder (its text tower as a CLIPTextModel)
        and --output_dir/tokenizer (EMA weights if enabled)."""
        from transformers import CLIPTextModel

        out = Path(self.cfg.output_dir)
        if self.accelerator.is_main_process:
            with trainer.averaged_weights() as clip:
                clip.save_pretrained(out / CLIP_FOLDER)
                text_encoder = CLIPTextModel(clip.config.text_config)
                text_encoder.load_state_dict(clip.text_model.state_dict())
                text_encoder.save_pretrained(out / "text_encoder")
            self.tokenizer.save_pretrained(out / "tokenizer")
            logger.info("saved the CLIP model, its text tower and the tokenizer to %s", out)
        self.accelerator.wait_for_everyone()
        return out
