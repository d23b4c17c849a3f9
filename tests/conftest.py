"""Shared test fixtures: a tiny Stable-Diffusion-layout folder written by diffusers itself.

`tiny_sd_dir` is the folder a new user would have: `model_index.json`, `unet/`, `vae/`, `text_encoder/`,
`tokenizer/`, `scheduler/`, written by `diffusers.StableDiffusionPipeline.save_pretrained` from tiny random
components (nothing downloaded). Its shape, like SD 1.x but tiny:

- VAE: 3 levels, so the VAE factor is 4 (not SD's 8: code that assumes 8 fails here); 4 latent channels.
- UNet: 2 levels (down-sampling factor 2), sample_size 8, so the default image is 8 * 4 = 32 px square.
- Text: a 2-layer CLIP text model (hidden size 32) and a CLIP BPE tokenizer built from the vocabulary and merges
  below, model_max_length 77 as in SD.
- Scheduler: a PNDM config with SD 1.x's values, as the real SD 1.x folders ship.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Words of the shapes world (shared/SHAPES.md) plus a few common ones, spelled out by the tokenizer's merges.
TOKENIZER_WORDS = (
    "a an and the of on in at to with photo picture image "
    "small large red green blue yellow purple orange white black gray "
    "circle square triangle star top bottom left right center background"
).split()

TINY_MAX_LENGTH = 77  # tokenizer.model_max_length, as in SD
TINY_TEXT_DIM = 32  # text hidden size == UNet cross_attention_dim
TINY_VAE_FACTOR = 4  # 2 ** (VAE levels - 1)
TINY_IMAGE_SIZE = 32  # default image side in pixels: UNet sample_size 8 x VAE factor 4


def build_tiny_clip_tokenizer(folder: str | Path, words: tuple[str, ...] | list[str] = TOKENIZER_WORDS):
    """A real `CLIPTokenizer` (byte-level BPE, CLIP's pre-tokenizer) over a tiny vocabulary, built offline."""
    from latentdiff.data.tokenizer import build_word_tokenizer

    return build_word_tokenizer(folder, words, model_max_length=TINY_MAX_LENGTH)


def build_tiny_sd_components(work_dir: str | Path, seed: int = 0) -> dict:
    """Tiny random diffusers/transformers components of an SD-1.x-shaped pipeline (see the module docstring).

    `work_dir` receives the tokenizer's source files.
    """
    tokenizer = build_tiny_clip_tokenizer(Path(work_dir) / "tokenizer-source")
    # The diffusers/transformers constructors draw their random weights from the global RNG: seed it inside a fork
    # so that building the fixture leaves the other tests' random state alone.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _tiny_sd_components(tokenizer)


def _tiny_sd_components(tokenizer) -> dict:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // TINY_VAE_FACTOR,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TINY_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def build_tiny_sd_folder(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD-layout folder with `diffusers.StableDiffusionPipeline.save_pretrained`; returns `path`."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    pipe = StableDiffusionPipeline(
        **build_tiny_sd_components(path.parent, seed),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-layout folder written by diffusers (read-only for tests: copy it before changing anything)."""
    return build_tiny_sd_folder(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and much faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The imagefolder of `tests.test_data.make_imagefolder` (9 images, one corrupt) for training runs."""
    from tests.test_data import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("train-data") / "images")


@pytest.fixture
def eager_compile(monkeypatch) -> list[dict]:
    """torch.compile with dynamo's eager backend (the same graph and guards as inductor, traced in seconds instead of
    minutes); returns the list of keyword arguments each torch.compile call was given."""
    real_compile, asked = torch.compile, []

    def compile_eagerly(model, **kwargs):
        asked.append(kwargs)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return asked
