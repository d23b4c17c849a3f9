"""The DreamBooth task (Ruiz et al. 2023, arXiv:2208.12242): fine-tune a text-to-image model on a few images of a
subject, with an identifier in the prompt, and keep what it drew before with a class-specific prior.

| code name           | symbol | meaning                                                                            |
|---------------------|--------|------------------------------------------------------------------------------------|
| instance images     | x      | the subject's images (--instance_data_dir), prompt c = --instance_prompt or their captions |
| class images        | x_pr   | drawn by the base model from --class_prompt c_pr before training (--class_data_dir)  |
| `prior_loss_weight` | λ      | the weight of the prior-preservation term                                           |

    L = E[ w_t ‖x̂_θ(α_t x + σ_t ε, c) − x‖² ] + λ E[ w_t' ‖x̂_θ(α_t' x_pr + σ_t' ε', c_pr) − x_pr‖² ]   (the paper's eq. 2)

in this project's noise-prediction form: each term is the text-to-image loss (`train.tasks.t2i`), the mean over
the instance half and over the class half of a batch (a batch of B pairs holds 2B samples, instances first, as in
diffusers' `train_dreambooth.py`).

With `--prior_target model` the class term fits the frozen base model instead of the class image:

    λ E[ w_t' ‖x̂_θ(z_t', c_pr) − x̂_θ₀(z_t', c_pr)‖² ],   z_t' = α_t' x_pr + σ_t' ε'

(θ₀ the weights before training; with --use_lora the same UNet with its adapters at scale 0). This is the
distillation of Learning without Forgetting (Li & Hoiem 2016) in DreamBooth's place: the prior is what the base
model predicts, exactly, rather than images it drew, whose flaws the paper's term would teach again.

What is trained: the whole UNet (and with --train_text_encoder the text encoder), exported as a pipeline folder; or
with --use_lora adapters on the frozen model (`train.tasks.lora`), exported as an adapter. The flag names are
diffusers' (`--instance_data_dir`, `--instance_prompt`, `--class_data_dir`, `--class_prompt`, `--num_class_images`,
`--with_prior_preservation`, `--prior_loss_weight`, `--sample_batch_size`, `--train_text_encoder`).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from latentdiff.data.dataset import without_image_decoding
from latentdiff.lora import scaled_adapters
from latentdiff.sampling_settings import SamplingSettings, write_sampling_settings
from train.loop import Trainer
from train.loop_config import ConfigError, flag
from train.randomness import BatchRandom, derive_seed
from train.tasks.lora import LoraConfig, LoraTask
from train.tasks.t2i import TextToImageTask
from train.tasks.t2i_config import T2IConfig
from train.tasks.t2i_models import T2IModels

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLASS_METADATA = (
    "metadata.jsonl"  # the class images' prompts, one JSON line per image (an imagefolder's file)
)


@dataclass(frozen=True)
class DreamBoothConfig(LoraConfig):
    """Every option of `train/train_dreambooth.py`: those of `train_lora.py` plus DreamBooth's (diffusers' names)."""

    EXPORTED: ClassVar[tuple[str, ...]] = (*T2IConfig.EXPORTED, *LoraConfig.EXPORTED)

    train_data_dir: str | None = flag(
        None,
        "The subject's images (diffusers' --instance_data_dir): a folder of images, prompted with "
        "--instance_prompt, or an imagefolder with a metadata.jsonl whose captions are the prompts.",
        aliases=("instance_data_dir",),
    )
    instance_prompt: str | None = flag(
        None,
        "The prompt of every instance image, with the subject's identifier (e.g. 'a photo of sks dog'). Default: "
        "each image's caption from the folder's metadata.jsonl.",
    )
    with_prior_preservation: bool = flag(
        False,
        "Add the class-specific prior-preservation loss on images the base model draws from --class_prompt.",
    )
    prior_loss_weight: float = flag(1.0, "lambda: the weight of the prior-preservation loss.", at_least=0)
    prior_target: str = flag(
        "images",
        "What the class images' term fits: images (the paper's: the true noise of each noised class image) or "
        "model (the frozen base model's own prediction at the same noisy latent, timestep and prompt: a prior kept "
        "by distillation, so the class images may be any images of the class, e.g. real ones, and the prior is "
        "what the model did, not its samples' flaws). With --use_lora the teacher is the UNet with its adapters "
        "switched off; a full fine-tune keeps a frozen copy of the UNet (its size again in memory).",
        choices=("images", "model"),
    )
    class_data_dir: str | None = flag(
        None,
        "Where the class images are (with their prompts in metadata.jsonl): generated by the base model once, "
        "reused by later runs, topped up when fewer than --num_class_images.",
    )
    class_prompt: str | None = flag(
        None,
        "The prompt of the class images (e.g. 'a photo of dog'), or a .txt file of prompts, one per line, used in "
        "turn (a class with several kinds, such as the shapes world's scenes).",
    )
    num_class_images: int = flag(
        100, "How many class images the prior uses (generated when missing).", at_least=1
    )
    sample_batch_size: int = flag(4, "Batch size of the class-image generation.", at_least=1)
    use_lora: bool = flag(
        False,
        "Train LoRA adapters (--rank, --lora_alpha, --lora_targets) on the frozen model instead of the whole UNet; "
        "the export is then an adapter, not a pipeline folder.",
    )
    output_dir: str = flag("dreambooth-model", "Where checkpoints, logs, validation images and the model go.")

    def check_combinations(self) -> None:
        super().check_combinations()
        if self.with_prior_preservation and (self.class_data_dir is None or self.class_prompt is None):
            raise ConfigError(
                "--with_prior_preservation needs --class_data_dir (where the class images go) and --class_prompt "
                "(what the base model draws there, e.g. 'a photo of dog')."
            )
        if self.prior_target == "model" and not self.with_prior_preservation:
            raise ConfigError(
                "--prior_target model sets the target of the class images' term: add --with_prior_preservation "
                "(with --class_data_dir and --class_prompt), or leave --prior_target at images."
            )
        if self.prior_target == "model" and self.train_text_encoder:
            raise ConfigError(
                "--prior_target model distils the frozen model's predictions, and with --train_text_encoder the "
                "prompts it reads would change as it trains: train the UNet alone, or use --prior_target images."
            )
        if self.pretrained_model_name_or_path is None or self.unet_config is not None:
            raise ConfigError(
                "DreamBooth fine-tunes a trained model: pass --pretrained_model_name_or_path (and no --unet_config)."
            )

    def class_prompts(self) -> list[str]:
        """The class prompts: --class_prompt, or the lines of the .txt file it names."""
        path = Path(self.class_prompt)
        if path.suffix == ".txt":
            if not path.is_file():
                raise ConfigError(f"--class_prompt={self.class_prompt!r}: no such prompt file.")
            prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not prompts:
                raise ConfigError(f"--class_prompt={self.class_prompt!r} holds no prompt.")
            return prompts
        return [self.class_prompt]


# ---- data ---------------------------------------------------------------------------------------------------------


def prompted_images(images: list[Path], prompts: list[str], image_column: str, caption_column: str):
    """A `datasets.Dataset` of image files (not decoded) and their prompts, like an imagefolder's."""
    import datasets

    table = datasets.Dataset.from_dict({image_column: [str(p) for p in images], caption_column: prompts})
    return without_image_decoding(table.cast_column(image_column, datasets.Image()), image_column)


def instance_images(cfg: DreamBoothConfig):
    """The instance dataset: the folder's images with --instance_prompt, or the folder read as an imagefolder
    (captions from metadata.jsonl) when no --instance_prompt is given."""
    from train.data import load_data

    if cfg.instance_prompt is None:
        return load_data(cfg)
    folder = Path(cfg.train_data_dir)
    files = (
        sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    )
    if not files:
        raise ConfigError(
            f"--instance_data_dir={cfg.train_data_dir!r} holds no images ({', '.join(IMAGE_SUFFIXES)})."
        )
    return prompted_images(files, [cfg.instance_prompt] * len(files), cfg.image_column, cfg.caption_column)


def read_class_images(folder: Path) -> list[tuple[Path, str]]:
    """(image, prompt) of every class image listed in the folder's metadata.jsonl whose file is there."""
    index = folder / CLASS_METADATA
    if not index.is_file():
        return []
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    return [(folder / row["file_name"], row["text"]) for row in rows if (folder / row["file_name"]).is_file()]


@torch.no_grad()
def generate_class_images(
    cfg: DreamBoothConfig, models: T2IModels, accelerator: Accelerator, seed: int, settings: SamplingSettings
) -> list[tuple[Path, str]]:
    """Make sure --class_data_dir holds --num_class_images images of the base model (before any training): the ones
    there are counted and reused, the missing ones drawn (image i: class prompt i mod P, its own seed; DDIM at the
    steps and guidance of the base model's `settings`, else --validation_num_inference_steps and
    --validation_guidance_scale), with a progress bar. Returns the (image, prompt) pairs used."""
    from latentdiff.schedulers import DDIMScheduler
    from pipelines.latent_pipeline import LatentPipeline

    folder = Path(cfg.class_data_dir)
    have = read_class_images(folder)
    missing = cfg.num_class_images - len(have)
    logger.info("%d class images in %s; %d to generate", len(have), folder, max(missing, 0))
    if missing > 0 and accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        pipe = LatentPipeline(
            models.unet,
            DDIMScheduler.from_config(models.noise_scheduler.config),
            models.vae,
            models.text_encoder,
            models.tokenizer,
        )
        pipe.set_progress_bar_config(disable=True)
        steps = settings.num_inference_steps or cfg.validation_num_inference_steps
        guidance = settings.guidance_scale or cfg.validation_guidance_scale
        prompts = cfg.class_prompts()
        resolution = cfg.resolution
        models.unet.eval()
        with (folder / CLASS_METADATA).open("a") as index:
            for start in tqdm(
                range(len(have), cfg.num_class_images, cfg.sample_batch_size),
                desc="class images",
                unit="batch",
            ):
                numbers = range(start, min(start + cfg.sample_batch_size, cfg.num_class_images))
                batch = [prompts[i % len(prompts)] for i in numbers]
                generators = [
                    torch.Generator().manual_seed(derive_seed(seed, "class image", i)) for i in numbers
                ]
                with accelerator.autocast():
                    images = pipe(
                        batch,
                        num_inference_steps=steps,
                        guidance_scale=guidance,
                        height=resolution,
                        width=resolution,
                        generator=generators,
                    ).images
                for i, prompt, image in zip(numbers, batch, images):
                    name = f"class-{i:06d}.png"
                    image.save(folder / name)
                    index.write(json.dumps({"file_name": name, "text": prompt}) + "\n")
        models.unet.train()
    accelerator.wait_for_everyone()
    return read_class_images(folder)[: cfg.num_class_images]


class PairedSamples(torch.utils.data.Dataset):
    """Item (epoch, i): instance sample i and class sample i mod C, for a batch of instances then classes."""

    def __init__(self, instances: torch.utils.data.Dataset, classes: torch.utils.data.Dataset) -> None:
        self.instances, self.classes = instances, classes

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict[str, Any], dict[str, Any]]:
        epoch, index = key
        return self.instances[key], self.classes[(epoch, index % len(self.classes))]


class PairedRandom:
    """The randomness of a batch of B pairs (2B samples): the instances draw from the loop's `BatchRandom`, exactly
    as text-to-image training would, the classes from a second stream of the same shape seeded from it."""

    def __init__(self, rng: BatchRandom) -> None:
        self.instances = rng
        self.classes = copy.copy(rng)
        self.classes.generator = torch.Generator().manual_seed(
            derive_seed(rng.generator.initial_seed(), "class images")
        )

    def _both(self, draw: str, *args: int) -> torch.Tensor:
        return torch.cat([getattr(self.instances, draw)(*args), getattr(self.classes, draw)(*args)])

    def randn(self, *shape: int) -> torch.Tensor:
        return self._both("randn", *shape)

    def rand(self, *shape: int) -> torch.Tensor:
        return self._both("rand", *shape)

    def randint(self, low: int, high: int) -> torch.Tensor:
        return self._both("randint", low, high)


def prior_preservation_loss(
    instance_losses: torch.Tensor, class_losses: torch.Tensor, prior_loss_weight: float
) -> torch.Tensor:
    """L = mean(instance losses) + λ · mean(class losses) (eq. 2); each (B,)."""
    return instance_losses.mean() + prior_loss_weight * class_losses.mean()


# ---- the task -----------------------------------------------------------------------------------------------------


class DreamBoothTask(LoraTask):
    """Text-to-image training on the instance images, plus the prior-preservation term on the class images; the
    export is a pipeline folder (full fine-tune, carrying the base model's sampling `settings`) or an adapter
    (--use_lora)."""

    def __init__(self, cfg, models, accelerator, seed, settings: SamplingSettings) -> None:
        super().__init__(cfg, models, accelerator, seed)
        self.settings = settings
        # the frozen base UNet of --prior_target model for a full fine-tune (adapters are switched off instead)
        self.base_unet = None
        if cfg.with_prior_preservation and cfg.prior_target == "model" and not cfg.use_lora:
            self.base_unet = copy.deepcopy(models.unet).requires_grad_(False).eval()

    def paired_datasets(self, instances, classes: list[tuple[Path, str]] | None):
        """(training dataset, collate function), the held-out instances attached for validation. With a prior,
        items are (instance, class) pairs and a batch holds the B instances first, then their B classes
        (`num_instances`: B)."""
        train, holdout, collate = self.datasets(instances)
        self.attach_holdout(holdout, collate)
        if classes is None:
            return train, collate
        cfg = self.cfg
        files, prompts = zip(*classes)
        class_set, _, _ = self.datasets(
            prompted_images(list(files), list(prompts), cfg.image_column, cfg.caption_column), holdout=0
        )

        def collate_pairs(pairs: list[tuple[dict, dict]]) -> dict[str, Any]:
            batch = collate([p[0] for p in pairs] + [p[1] for p in pairs])
            return {**batch, "num_instances": len(pairs)}

        return PairedSamples(train, class_set), collate_pairs

    def teacher_from(self, batch: dict[str, Any]) -> int | None:
        """With --prior_target model, the class half of the batch is fit to the frozen model's prediction."""
        if self.cfg.prior_target == "model" and "num_instances" in batch:
            return batch["num_instances"]
        return None

    def teacher_prediction(self, unet, noisy_latents, timesteps, prompt_embeds) -> torch.Tensor:
        """x̂_θ₀(z_t, c): the UNet with its adapters at scale 0 (--use_lora), or the copy kept before training."""
        if self.base_unet is not None:
            return self.base_unet(noisy_latents, timesteps, prompt_embeds)
        with scaled_adapters(unet, 0.0):
            return unet(noisy_latents, timesteps, prompt_embeds)

    def compute_loss(self, model, batch: dict[str, Any], rng: BatchRandom) -> torch.Tensor:
        """The instance loss, plus λ times the class loss when the batch holds class images."""
        if "num_instances" not in batch:
            return super().compute_loss(model, batch, rng)
        losses = self.sample_losses(model, batch, PairedRandom(rng))
        n = batch["num_instances"]
        return prior_preservation_loss(losses[:n], losses[n:], self.cfg.prior_loss_weight)

    def export(self, trainer: Trainer) -> Path:
        """An adapter (--use_lora), or the pipeline folder with the base model's sampling settings."""
        if self.cfg.use_lora:
            return super().export(trainer)
        out = TextToImageTask.export(self, trainer)
        if self.accelerator.is_main_process and self.settings != SamplingSettings():
            write_sampling_settings(out, self.settings)
        return out
