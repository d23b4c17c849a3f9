"""Fetching a model folder from the Hugging Face hub: one place for what is downloaded and what is not.

Only configs, tokenizer files and safetensors weights come down (no pickles, no duplicate variants, no single-file
checkpoints beside the folder layout); `local_folder` returns a local path for a local folder or a hub id alike.
"""

from __future__ import annotations

from pathlib import Path

# The diffusers Stable Diffusion folder layout: model_index.json and one subfolder per part.
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# A pipeline's parts, or a lone part (a VAE or a text encoder repository) at the root.
HUB_ALLOW_PATTERNS = [
    "model_index.json",
    *(f"{name}/*" for name in SUBFOLDERS),
    "*.json",
    "*.txt",
    "diffusion_pytorch_model*.safetensors",
    "model*.safetensors",
]
HUB_IGNORE_PATTERNS = [
    "*.bin",
    "*.ckpt",
    "*.msgpack",
    "*.onnx",
    "*.pb",
    "*.h5",
    "*fp16*",
    "*non_ema*",
    "*.ema.*",
]


def local_folder(
    path_or_hub_id: str | Path,
    cache_dir: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
) -> Path:
    """`path_or_hub_id` itself when it is a local folder, else its hub snapshot (`huggingface_hub.snapshot_download`).

    variant: a weights variant (e.g. "fp16") to fetch instead of skipping it.
    """
    if Path(path_or_hub_id).is_dir():
        return Path(path_or_hub_id)
    from huggingface_hub import snapshot_download

    ignore = [p for p in HUB_IGNORE_PATTERNS if variant is None or variant not in p]
    return Path(
        snapshot_download(
            str(path_or_hub_id),
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=HUB_ALLOW_PATTERNS,
            ignore_patterns=ignore,
        )
    )
