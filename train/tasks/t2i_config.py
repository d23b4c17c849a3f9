"""The text-to-image task's flags: the loop's (`LoopConfig`) plus the model, the latent cache, the diffusion
objective and the validation images. `train_t2i.py --help` lists them all; `LoraConfig` extends this one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from latentdiff.hub import SUBFOLDERS
from latentdiff.model_card import CARD_NAME
from latentdiff.schedulers.base import PREDICTION_TYPES
from train.loop_config import ConfigError, LoopConfig, flag

LATENT_CACHE_FOLDER = "latent_cache"  # --cache_latents' default place, inside --output_dir
LATENT_SAMPLES = ("mean", "sample")  # what z0 is: the VAE posterior's mean, or a sample of it


@dataclass(frozen=True)
class T2IConfig(LoopConfig):
    """Every option of `train/train_t2i.py`. Read-only once built; `dataclasses.replace` makes a changed copy."""

    EXPORTED: ClassVar[tuple[str, ...]] = (
        *SUBFOLDERS,
        "model_index.json",
        CARD_NAME,
    )  # the SD-layout pipeline
    CACHES: ClassVar[tuple[str, ...]] = (LATENT_CACHE_FOLDER,)

    # ---- model ---------------------------------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = flag(
        None,
        "SD-layout folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or hub id. Its VAE "
        "and text encoder are frozen; its UNet is trained unless --unet_config is given.",
    )
    revision: str | None = flag(None, "Hub revision (branch, tag or commit) of the models given as hub ids.")
    variant: str | None = flag(
        None,
        "Weights variant of the pretrained models, e.g. fp16 (reads diffusion_pytorch_model.fp16.safetensors).",
    )
    unet_config: str | None = flag(
        None,
        "JSON or YAML file of a UNetConfig (field names of latentdiff.models.unet.UNetConfig, or a diffusers "
        "UNet2DConditionModel config.json): train a randomly initialised UNet of this shape from scratch.",
        exists="file",
    )
    pretrained_vae_model_name_or_path: str | None = flag(
        None,
        "Folder of a diffusers AutoencoderKL (or an SD folder with vae/) used instead of the one in "
        "--pretrained_model_name_or_path.",
    )
    pretrained_text_encoder_name_or_path: str | None = flag(
        None,
        "Folder with a transformers CLIP text model and tokenizer (or an SD folder with text_encoder/ and "
        "tokenizer/) used instead of the one in --pretrained_model_name_or_path.",
    )
    noise_scheduler_config: str | None = flag(
        None,
        "scheduler_config.json of the training noise schedule; default: the scheduler/ of "
        "--pretrained_model_name_or_path, else Stable Diffusion's scaled_linear schedule.",
        exists="file",
    )
    train_text_encoder: bool = flag(
        False,
        "Train the text encoder together with the UNet (same optimizer and learning rate; exported with the "
        "pipeline). A text tower pre-trained contrastively may not encode every word the images depend on "
        "(positions, say); training it on the diffusion loss teaches it those.",
    )
    text_encoder_init: str = flag(
        "pretrained",
        "pretrained: the text encoder's weights as loaded; random: a text encoder of the same config (and the same "
        "tokenizer) with fresh weights, trained with the UNet (needs --train_text_encoder).",
        choices=("pretrained", "random"),
    )
    text_encoder_layers: int | None = flag(
        None,
        "With --text_encoder_init random: the fresh text encoder's number of transformer layers (default: its "
        "config's). 0 leaves each token its own embedding plus its position: words never mix, so a colour and a "
        "shape the data never showed together are still read as that colour and that shape.",
        at_least=0,
    )
    gradient_checkpointing: bool = flag(
        False, "Recompute UNet activations in the backward pass to save memory."
    )
    compile: bool = flag(
        False,
        "torch.compile the UNet as one graph (fullgraph=True) before training: faster steps after a first step that "
        "compiles (minutes on a CPU); see BENCHMARKS.md.",
    )

    # ---- latent cache --------------------------------------------------------------------------------------------
    cache_latents: bool = flag(
        False,
        "Encode every image (and its mirror image) with the VAE and every caption with the text encoder once, keep "
        "them on disk, and train from the cached VAE posteriors. Reused by later runs with the same VAE, text "
        "encoder, resolution, crop/flip settings and data; recomputed when one of them changes.",
    )
    latents_cache_dir: str | None = flag(
        None,
        "Where --cache_latents keeps its files (default: <output_dir>/latent_cache); share it between runs.",
    )

    # ---- diffusion objective -----------------------------------------------------------------------------------
    prediction_type: str | None = flag(
        None,
        "What the UNet learns to predict: epsilon | v_prediction | sample (x0). Default: the noise scheduler's.",
        choices=PREDICTION_TYPES,
    )
    snr_gamma: float | None = flag(
        None,
        "Min-SNR-gamma loss weighting (arXiv:2303.09556), e.g. 5.0; correct for each prediction type.",
        above=0,
        example="5.0 (the paper's), or leave it unset",
    )
    noise_offset: float = flag(
        0.0, "Scale of the per-channel offset added to the noise (0: none), e.g. 0.05.", at_least=0
    )
    input_perturbation: float = flag(
        0.0,
        "Scale of the extra noise added to the model's input noise only, the target staying the drawn noise "
        "(Ning et al. 2023, arXiv:2301.11706), e.g. 0.1; 0: none.",
        at_least=0,
    )
    latent_sample: str = flag(
        "sample",
        "Train on a sample of the VAE posterior, z0 = mu + sigma*eps (sample, as Stable Diffusion's VAE is "
        "trained), or on its mean mu (mean: for a VAE whose decoder was trained on the mean, such as "
        "train_vae.py --latent_sample mean; its sigma carries no information and sampling it buries the image "
        "in noise).",
        choices=LATENT_SAMPLES,
    )
    cond_dropout_prob: float = flag(
        0.1,
        "Probability, per sample and step, of replacing the caption by the empty prompt (classifier-free "
        "guidance needs it). Also accepted as diffusers' --proportion_empty_prompts.",
        at_least=0,
        at_most=1,
        example="0.1",
        aliases=("proportion_empty_prompts",),
    )

    # ---- inpainting ----------------------------------------------------------------------------------------------
    inpainting: bool = flag(
        False,
        "Train an SD-inpainting UNet: it reads the noisy latents, the mask at latent size and the masked image's "
        "latents (2C+1 channels), with random rectangles and ellipses as masks (train/tasks/inpaint_masks.py). A "
        "text-to-image UNet gets the extra input channels zero-initialised (it starts as the text-to-image model); "
        "the exported folder loads with LatentInpaintPipeline.from_pretrained.",
    )
    inpainting_full_mask_prob: float = flag(
        0.25,
        "With --inpainting: probability, per sample and step, that the whole image is masked (Stable Diffusion "
        "inpainting's 25%), so the UNet still draws from the prompt alone.",
        at_least=0,
        at_most=1,
    )

    # ---- validation images -------------------------------------------------------------------------------------
    validation_prompts: list[str] | None = flag(
        None, "Prompts rendered into a grid at each validation (prompt i uses seed i)."
    )
    validation_num_inference_steps: int = flag(25, "Sampler steps of the validation images.", at_least=1)
    validation_guidance_scale: float = flag(7.5, "Classifier-free guidance scale of the validation images.")

    def check_combinations(self) -> None:
        super().check_combinations()
        if self.pretrained_model_name_or_path is None:
            missing = [
                name
                for name, value in (
                    ("--unet_config", self.unet_config),
                    ("--pretrained_vae_model_name_or_path", self.pretrained_vae_model_name_or_path),
                    ("--pretrained_text_encoder_name_or_path", self.pretrained_text_encoder_name_or_path),
                )
                if value is None
            ]
            if missing:
                raise ConfigError(
                    "no model: pass --pretrained_model_name_or_path (an SD-layout folder or hub id), or all of "
                    f"--unet_config, --pretrained_vae_model_name_or_path and --pretrained_text_encoder_name_or_path "
                    f"(missing: {', '.join(missing)})."
                )
        if self.text_encoder_init == "random" and not self.train_text_encoder:
            raise ConfigError(
                "--text_encoder_init random gives the UNet an untrained text encoder: add --train_text_encoder."
            )
        if self.text_encoder_layers is not None and self.text_encoder_init != "random":
            raise ConfigError(
                "--text_encoder_layers sets the depth of a fresh text encoder: add --text_encoder_init random."
            )
        if self.cache_latents and not self.center_crop:
            raise ConfigError(
                "--cache_latents stores one crop per image, so random crops cannot be cached: add --center_crop "
                "(or drop --cache_latents)."
            )
        if self.inpainting and self.cache_latents:
            raise ConfigError(
                "--inpainting encodes each step's masked images with the VAE, so it needs the images, not cached "
                "latents: drop --cache_latents."
            )
        if isinstance(self.validation_prompts, str):
            raise ConfigError("--validation_prompts must be a list of prompts, not one string.")
