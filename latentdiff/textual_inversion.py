"""Textual inversion (Gal et al. 2022, arXiv:2208.01618): a new word for a concept, learned as token embeddings.

A placeholder token S* is added to the tokenizer and its row v* of the text encoder's token-embedding matrix E is the
only thing learned; every other row of E, and every other weight, stays as it was:

| code name          | symbol | meaning                                                                          |
|--------------------|--------|----------------------------------------------------------------------------------|
| `token`            | S*     | the placeholder, e.g. "<star>"; N vectors make the tokens S*, S*_1, ..., S*_N-1   |
| `vectors`          | v*     | (N, D) the learned embeddings, D the text encoder's hidden size                   |
| `token_ids`        |        | (N,) their rows in E (new rows, appended after the tokenizer's vocabulary)        |

    v* = argmin_v E_{z, c(S*), ε, t} ‖ε − ε_θ(z_t, t, c_θ(y; v))‖²     (the paper's eq. 2; the UNet θ frozen)

Files: diffusers' `learned_embeds.safetensors`, one tensor `{token: (N, D)}` (what diffusers'
`train_textual_inversion.py` writes and `StableDiffusionPipeline.load_textual_inversion` reads); the web UI's
safetensors files `{"emb_params": (N, D)}` load too, named after the file. A prompt that names a multi-vector token
is expanded to `S* S*_1 ... S*_N-1` before tokenizing (`expand_prompt`), as diffusers does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from latentdiff.validation import check_safetensors_file

TEXT_INVERSION_WEIGHTS_NAME = "learned_embeds.safetensors"  # diffusers' file name
WEBUI_KEY = "emb_params"  # the web UI's (AUTOMATIC1111) safetensors key


def vector_tokens(token: str, num_vectors: int) -> list[str]:
    """The tokens of a placeholder with `num_vectors` vectors: [S*, S*_1, ..., S*_{N-1}] (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def existing_token(tokenizer, word: str) -> str | None:
    """The token `word` already is in `tokenizer` (itself, or a BPE word piece such as "star</w>"), else None."""
    vocab = tokenizer.get_vocab()
    if word in vocab:
        return word
    pieces = tokenizer.tokenize(word)
    return pieces[0] if len(pieces) == 1 and pieces[0] in vocab else None


def check_new_tokens(tokenizer, tokens: list[str]) -> None:
    """ValueError if a token is already known to the tokenizer (it would shadow a word the model was trained on)."""
    for token in tokens:
        known = existing_token(tokenizer, token)
        if known is not None:
            raise ValueError(
                f"token {token!r} is already in the tokenizer's vocabulary (as {known!r}, id "
                f"{tokenizer.convert_tokens_to_ids(known)}); choose a new word for the concept, e.g. "
                f"'<{token.strip('<>')}>'."
            )


def initializer_vector(tokenizer, text_encoder: nn.Module, word: str) -> torch.Tensor:
    """(D,) the embedding row of `word`, which must be one token (diffusers' --initializer_token rule)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"initializer token {word!r} is {len(ids)} tokens for this tokenizer "
            f"({tokenizer.convert_ids_to_tokens(ids)}); pass a word it reads as one token."
        )
    return text_encoder.get_input_embeddings().weight[ids[0]].detach().clone()


def add_tokens(tokenizer, text_encoder: nn.Module, token: str, vectors: torch.Tensor) -> list[int]:
    """Add S* (and S*_1 ... for several vectors) to `tokenizer` and their rows v* to `text_encoder`'s embedding
    matrix E (grown as needed; the rows already there are left untouched). Returns the new tokens' ids.

    Args:
        token: the placeholder S*.
        vectors: (N, D) or (D,), D the text encoder's hidden size.
    Raises:
        ValueError: a token already known, or vectors of another width than E's (naming both).
    """
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    embedding = text_encoder.get_input_embeddings()
    width = embedding.weight.shape[1]
    if vectors.ndim != 2 or vectors.shape[1] != width:
        raise ValueError(
            f"the embedding for {token!r} has shape {tuple(vectors.shape)} but this text encoder's token "
            f"embeddings are {width} wide: the file was made for another text encoder (another model family); "
            f"use an embedding trained for this model (hidden size {width})."
        )
    tokens = vector_tokens(token, len(vectors))
    check_new_tokens(tokenizer, tokens)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if max(ids) >= embedding.weight.shape[0]:
        text_encoder.resize_token_embeddings(max(ids) + 1)
        embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        embedding.weight[ids] = vectors.to(embedding.weight)
    return ids


def expand_prompt(tokenizer, prompt: str) -> str:
    """`prompt` with each multi-vector placeholder S* written as `S* S*_1 ... S*_N-1` (diffusers'
    `maybe_convert_prompt`); a prompt without one comes back unchanged."""
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            count = 1
            while f"{token}_{count}" in added:
                count += 1
            prompt = re.sub(
                rf"(?<!\S){re.escape(token)}(?!\S)", " ".join(vector_tokens(token, count)), prompt
            )
    return prompt


def save_textual_inversion(save_directory: str | os.PathLike, token: str, vectors: torch.Tensor) -> Path:
    """Write `{token: (N, D) float32}` as `learned_embeds.safetensors` in `save_directory` (diffusers' format);
    returns its path."""
    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TEXT_INVERSION_WEIGHTS_NAME
    partial = path.with_name(path.name + ".partial")
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    save_file({token: vectors.detach().float().cpu().contiguous()}, str(partial), metadata={"format": "pt"})
    os.replace(partial, path)
    return path


def read_textual_inversion_file(path: str | os.PathLike) -> tuple[str, torch.Tensor]:
    """(token, (N, D) vectors) of a learned-embeddings file: a folder holding `learned_embeds.safetensors` or a
    `.safetensors` file, in diffusers' layout `{token: tensor}` or the web UI's `{"emb_params": tensor}` (token:
    the file's stem)."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / TEXT_INVERSION_WEIGHTS_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no textual inversion embedding at {str(path)!r}: pass a folder holding {TEXT_INVERSION_WEIGHTS_NAME} "
            "(what train/train_textual_inversion.py and diffusers write) or a .safetensors file."
        )
    if file.suffix != ".safetensors":
        raise ValueError(
            f"{file} is not a .safetensors file; pickled embeddings (.bin, .pt) can run code when loaded and are "
            "not read: convert it to safetensors."
        )
    check_safetensors_file(file)
    tensors = load_file(str(file))
    if len(tensors) != 1:
        raise ValueError(
            f"{file} holds {len(tensors)} tensors ({sorted(tensors)[:4]}); a learned-embeddings file holds one, "
            "{token: (N, D)}."
        )
    ((key, vectors),) = tensors.items()
    token = file.stem if key == WEBUI_KEY else key
    return token, vectors[None] if vectors.ndim == 1 else vectors
