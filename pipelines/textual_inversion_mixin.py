"""Textual inversion on a pipeline: `pipe.load_textual_inversion(path, token=...)`, diffusers' call.

    pipe.load_textual_inversion("out/ti-star")                       # learned_embeds.safetensors: {"<star>": (N, D)}
    pipe.load_textual_inversion("embedding.safetensors", token="<x>")  # any name for the new word
    pipe("a large <star> in the center").images

The token and its vectors go into the pipeline's tokenizer and text encoder (`latentdiff.textual_inversion`); the
rows already in the embedding matrix are left as they were. Prompts naming a multi-vector token are expanded before
they are encoded (`maybe_convert_prompt`), so this pipeline gives the images diffusers' does with the same file.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from latentdiff import textual_inversion

logger = logging.getLogger(__name__)


class TextualInversionMixin:
    """`load_textual_inversion` and `maybe_convert_prompt` for a pipeline with `tokenizer` and `text_encoder`."""

    tokenizer: object
    text_encoder: nn.Module

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> str:
        """Add the learned embedding in `path` as a new word of the prompt.

        Args:
            path: a folder holding `learned_embeds.safetensors` (what `train/train_textual_inversion.py` and
                diffusers' script write) or a `.safetensors` file (diffusers' `{token: (N, D)}` or the web UI's
                `{"emb_params": (N, D)}`).
            token: the word to use in prompts; default: the one stored in the file.
        Returns:
            The token.
        Raises:
            FileNotFoundError: no file at `path`.
            ValueError: a token the tokenizer already knows, or an embedding of another width than this text
                encoder's (the pipeline is left unchanged).
        """
        stored, vectors = textual_inversion.read_textual_inversion_file(path)
        token = token or stored
        ids = textual_inversion.add_tokens(self.tokenizer, self.text_encoder, token, vectors)
        logger.info("loaded textual inversion %r (%d vector(s), ids %s) from %s", token, len(ids), ids, path)
        return token

    def maybe_convert_prompt(self, prompt: str | list[str]) -> str | list[str]:
        """The prompt(s) with multi-vector placeholders expanded to all their tokens."""
        if isinstance(prompt, str):
            return textual_inversion.expand_prompt(self.tokenizer, prompt)
        return [textual_inversion.expand_prompt(self.tokenizer, p) for p in prompt]
