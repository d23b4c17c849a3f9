"""LatentPipeline: text -> image by classifier-free-guided denoising in a VAE's latent space (Rombach et al. 2022).

The five parts are passed in and stay separate: this project's `ConditionalUNet` (ε, v or x̂₀ predictor) and sampler
(DDIM or DDPM, diffusers' interface), and the frozen `diffusers.AutoencoderKL`, `transformers.CLIPTextModel` and
`CLIPTokenizer`. The model and the sampler know nothing of each other: the denoising loop in `__call__` is the only
place they meet.

| code name              | symbol           | meaning                                                              |
|------------------------|------------------|----------------------------------------------------------------------|
| `latents`              | z_t              | current latent, (B, C, h, w), scaled by the VAE scaling factor        |
| `model_output_cond`    | ε_θ(z_t, c)      | UNet output given the prompt                                         |
| `model_output_uncond`  | ε_θ(z_t, ∅)      | UNet output given the negative (default: empty) prompt               |
| `guidance_scale`       | w                | classifier-free guidance: ε̃ = ε_θ(z_t, ∅) + w (ε_θ(z_t, c) - ε_θ(z_t, ∅))  (Ho & Salimans 2022) |
| `guidance_rescale`     | φ                | mix of ε̃ and ε̃ rescaled to the std of ε_θ(z_t, c) (Lin et al. 2023)   |
| `vae_factor`           | f                | image side / latent side, from the VAE config (8 for SD)             |
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from latentdiff import validation
from latentdiff.conditioning import decode_latents, encode_prompts, vae_scale_factor
from latentdiff.data.tokenizer import closed_vocabulary, unknown_words
from latentdiff.default_model import DEFAULT_MODEL_DIR
from latentdiff.hub import SUBFOLDERS
from latentdiff.sampling_settings import (
    DIFFUSERS_DEFAULTS,
    SETTINGS_FILE,
    SamplingSettings,
    write_sampling_settings,
)
from pipelines.classifier_guidance import (
    alpha_prod_at,
    check_class_labels,
    guide_model_output,
    log_prob_gradient,
)
from pipelines.inversion import InversionMixin
from pipelines.loading import load_parts, model_dir
from pipelines.lora_mixin import LoraMixin
from pipelines.textual_inversion_mixin import TextualInversionMixin

logger = logging.getLogger(__name__)


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass(frozen=True)
class PipelineOutput:
    """What `LatentPipeline.__call__` returns.

    images: by `output_type`: "pil" a list of B `PIL.Image` (RGB, uint8); "np" a float32 array (B, H, W, 3) in
        [0, 1]; "pt" a float tensor (B, 3, H, W) in [0, 1]; "latent" the final latents (B, C, h, w), scaled by the
        VAE scaling factor.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Rescaled classifier-free guidance, Lin et al. 2023 (arXiv:2305.08891) Sec. 3.4, final mix eq. 16.

    x_rescaled = x_cfg · σ_pos / σ_cfg;  x_final = φ · x_rescaled + (1 - φ) · x_cfg, with σ the standard deviation
    of each sample over all its elements. guided: x_cfg (B, C, h, w); cond: x_pos, the conditional prediction;
    guidance_rescale: φ in [0, 1].
    """
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn on the generator's device and moved to `device`.

    A list of generators draws sample i from generator i, so an image depends only on its own generator (the
    convention of diffusers, whose results this reproduces).
    """
    if isinstance(generator, list):
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


class LatentPipeline(InversionMixin, LoraMixin, TextualInversionMixin):
    """Text-to-image generation with classifier-free guidance over a VAE latent space.

    `LatentPipeline()` loads the embedded default model; `LatentPipeline(unet, scheduler, vae, text_encoder,
    tokenizer)` uses the given parts; `LatentPipeline.from_pretrained(path_or_hub_id)` reads a diffusers Stable
    Diffusion folder. A prompt given at construction, `LatentPipeline("a red circle")()` (or `prompt=` with the
    parts), is used by calls that name none; a model path there is refused with a pointer to `from_pretrained`.
    A folder's recommended sampling settings (`sampling_settings.json`, see `latentdiff.sampling_settings`) are
    kept in `sampling_settings` and used by `__call__` for what the caller does not set.
    `pipe.invert(image, prompt, num_inference_steps)` is DDIM inversion (pipelines/inversion.py);
    the editing pipelines (img2img_pipeline.py, inpaint_pipeline.py) subclass this one and share its steps.
    """

    def __init__(
        self,
        unet=None,
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        prompt=None,
        sampling_settings: SamplingSettings | None = None,
    ) -> None:
        # LatentPipeline("a prompt"): the embedded default, with that prompt
        if isinstance(unet, str | list | tuple):
            unet, prompt = None, _constructor_prompt(unet, prompt)
        self.prompt = prompt
        parts = {
            "unet": unet,
            "scheduler": scheduler,
            "vae": vae,
            "text_encoder": text_encoder,
            "tokenizer": tokenizer,
        }
        if all(part is None for part in parts.values()):
            if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"LatentPipeline() loads the embedded default model from {DEFAULT_MODEL_DIR}, which this "
                    "installation does not have yet. Pass the five parts, LatentPipeline(unet, scheduler, vae, "
                    "text_encoder, tokenizer), or load a Stable Diffusion folder in the diffusers layout: "
                    "LatentPipeline.from_pretrained('path/to/folder' or 'hub-owner/model-id')."
                )
            parts = load_parts(DEFAULT_MODEL_DIR)
            sampling_settings = parts.pop("sampling_settings")
        missing = [name for name, part in parts.items() if part is None]
        if missing:
            raise TypeError(
                f"LatentPipeline got no {', '.join(missing)}; pass all five parts (unet, scheduler, vae, "
                "text_encoder, tokenizer), or none for the embedded default."
            )
        self.unet = parts["unet"]
        self.scheduler = _no_latent_clipping(parts["scheduler"])
        self.vae = parts["vae"]
        self.text_encoder = parts["text_encoder"]
        self.tokenizer = parts["tokenizer"]
        self.sampling_settings = sampling_settings or SamplingSettings()
        self._progress_bar_config: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls, path_or_hub_id: str | Path, torch_dtype: torch.dtype | None = None, scheduler=None
    ) -> LatentPipeline:
        """Load a Stable Diffusion 1.x/2.x folder in the diffusers layout, with this project's UNet and sampler.

        Args:
            path_or_hub_id: a local folder holding `model_index.json`, `unet/`, `vae/`, `text_encoder/`,
                `tokenizer/`, `scheduler/`; or a Hugging Face hub id ("owner/name"), fetched with
                `huggingface_hub.snapshot_download` (configs and safetensors weights only) when no such folder
                exists locally.
            torch_dtype: dtype of the UNet, VAE and text encoder (default float32).
            scheduler: a sampler to use instead of the folder's (this project's or any diffusers scheduler); by
                default the folder's scheduler config loads this project's sampler of that name (Euler, Euler
                ancestral, Heun, DPM-Solver multistep), and DDPM, DDIM or PNDM configs (as SD ships) load its
                `DDIMScheduler` (see `latentdiff.schedulers.registry.scheduler_from_folder_config`); a folder's
                `sampling_settings.json` naming a sampler (`latentdiff.schedulers.registry.SAMPLERS`) loads that one.
        """
        return cls(**load_parts(model_dir(path_or_hub_id), torch_dtype, scheduler))

    @classmethod
    def from_pipe(cls, pipeline: LatentPipeline) -> LatentPipeline:
        """This class over another pipeline's five parts, shared rather than copied (as diffusers' `from_pipe`):
        `LatentInpaintPipeline.from_pipe(pipe)` inpaints with the model `pipe` has loaded, adapters included."""
        parts = (pipeline.unet, pipeline.scheduler, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer)
        new = cls(*parts, prompt=pipeline.prompt, sampling_settings=pipeline.sampling_settings)
        new.set_progress_bar_config(**pipeline._progress_bar_config)
        return new

    def save_pretrained(
        self,
        save_directory: str | Path,
        model_card: str | None = None,
        sampling_settings: SamplingSettings | None = None,
    ) -> None:
        """Write the diffusers Stable Diffusion layout: `model_index.json`, one subfolder per part, a model card
        `README.md` (`model_card`, default `latentdiff.model_card.pipeline_card`) and `sampling_settings.json`.

        diffusers' `StableDiffusionPipeline.from_pretrained` reads the result (UNet in `UNet2DConditionModel`
        format, sampler as `scheduler_config.json`), and so does `LatentPipeline.from_pretrained`.
        sampling_settings: the model's recommended sampling settings, written to `sampling_settings.json`
        (default: the ones this pipeline carries; none carried and none given: no file, so diffusers' defaults).
        """
        import diffusers

        from latentdiff.model_card import CARD_NAME, pipeline_card

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in SUBFOLDERS:
            getattr(self, name).save_pretrained(directory / name)
        # A UNet that also reads the mask and the masked image's latents (2C + 1 channels) is an inpainting model.
        inpainting = self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1
        model_index = {
            "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "text_encoder": ["transformers", type(self.text_encoder).__name__],
            "tokenizer": ["transformers", type(self.tokenizer).__name__],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", type(self.vae).__name__],
        }
        (directory / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
        settings = sampling_settings or self.sampling_settings
        if settings.to_dict():
            write_sampling_settings(directory, settings)
        else:
            (directory / SETTINGS_FILE).unlink(missing_ok=True)  # a stale file would speak for this model
        (directory / CARD_NAME).write_text(model_card or pipeline_card(directory))

    # ------------------------------------------------------------------------------------- device and bars

    @property
    def device(self) -> torch.device:
        """Where the UNet runs; latents and embeddings are moved there."""
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's dtype; latents and embeddings are cast to it."""
        return self.unet.dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LatentPipeline:
        """Move the UNet, VAE and text encoder to `device` and/or cast them to `dtype`; returns self."""
        for module in (self.unet, self.vae, self.text_encoder):
            # only what changes: diffusers warns on every `to(dtype=...)`, even a no-op one
            changes = {"device": device} if device is not None else {}
            if dtype is not None and dtype != module.dtype:
                changes["dtype"] = dtype
            module.to(**changes)
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Keyword arguments for the steps' tqdm bar, as in diffusers: `set_progress_bar_config(disable=True)`."""
        self._progress_bar_config = kwargs

    # ----------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        callback_on_step_end: Callable[..., dict | None] | None = None,
        classifier: torch.nn.Module | None = None,
        classifier_guidance_scale: float = 1.0,
        class_labels: Mapping[str, int | Sequence[int] | torch.Tensor] | None = None,
    ) -> PipelineOutput:
        """Generate images from text.

        Args:
            prompt: one prompt or a list of P prompts (or None when `prompt_embeds` is given); default: the prompt
                given at construction.
            negative_prompt: what to guide away from: one string for every prompt or a list of P; default the
                empty prompt. Only used when guidance_scale > 1.
            num_inference_steps: sampler steps, 1 .. the scheduler's num_train_timesteps; default: the model
                folder's sampling settings, else 50 (diffusers' default).
            guidance_scale: w of classifier-free guidance; w <= 1 runs the conditional branch alone; default: the
                model folder's sampling settings, else 7.5 (diffusers' default).
            guidance_rescale: φ in [0, 1] of Lin et al. 2023 against over-exposure; 0 turns it off.
            num_images_per_prompt: N images per prompt; the batch is B = P · N, prompt-major.
            height, width: image size in pixels, divisible by the VAE factor × the UNet's down-sampling factor;
                default: the UNet's sample_size × the VAE factor, or the size of `latents` when given.
            generator: randomness for the initial latents and stochastic steps; a list of B generators gives each
                image its own (image i then depends on generator i alone).
            latents: initial noise z_T, (B, C, h, w), standard normal (scaled by the sampler's init_noise_sigma
                here); default: drawn from `generator`.
            prompt_embeds: (P, L, D) text embeddings instead of `prompt`.
            negative_prompt_embeds: (P, L, D) instead of `negative_prompt`.
            eta: η of DDIM (0 deterministic, 1 DDPM-like variance); passed to the sampler's step when it takes
                one (any diffusers scheduler drives the loop: it gets only the keywords its step accepts).
            output_type: "pil", "np", "pt" or "latent" (see `PipelineOutput`).
            callback_on_step_end: called as f(pipeline, i, t, {"latents": z}) after step i; may return a dict
                whose "latents" replaces z.
            classifier: a noise-aware classifier p_φ(y | z_t) on latents (`latentdiff.models.classifier`) for
                classifier guidance (Dhariwal & Nichol 2021): each step's model output is shifted by
                s·√(1 − ᾱ_t)·∇ log p_φ(y | z_t) in the noise-prediction form (`pipelines.classifier_guidance`),
                after classifier-free guidance.
            classifier_guidance_scale: s; 0 turns classifier guidance off.
            class_labels: the target y, {attribute: class index, or a list of B}, one entry per attribute the
                classifier predicts (e.g. {"color": 2, "shape": 0, "cell": 4}); needed with `classifier`.

        Returns:
            PipelineOutput with `.images`.
        """
        if prompt is None and prompt_embeds is None:
            prompt = self.prompt  # the prompt given at construction, if any
        num_inference_steps, guidance_scale = self.resolve_sampling(num_inference_steps, guidance_scale)
        self._check_scalars(num_inference_steps, guidance_scale, guidance_rescale, num_images_per_prompt, eta)
        self._check_output(output_type, callback_on_step_end)
        validation.check_generator(generator)
        do_guidance = guidance_scale > 1.0
        self._check_unet_takes_latents()
        context = self._context(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, do_guidance
        )
        batch_size = context.shape[0] // 2 if do_guidance else context.shape[0]
        labels = self._class_labels(classifier, classifier_guidance_scale, class_labels, batch_size)
        guide = None
        if labels is not None:
            guide = functools.partial(self._classifier_shift, classifier, labels, classifier_guidance_scale)
        # timesteps first: a σ-sampler's init_noise_sigma is its first σ, which set_timesteps chooses
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = self._initial_latents(batch_size, height, width, generator, latents)
        latents = self._denoise(
            latents,
            self.scheduler.timesteps,
            context,
            guidance_scale,
            guidance_rescale,
            generator,
            eta,
            callback_on_step_end,
            guide=guide,
        )
        return PipelineOutput(images=self._to_output(latents, output_type))

    # ----------------------------------------------------------------------------------- __call__'s parts

    def _context(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        num_images_per_prompt: int,
        do_guidance: bool,
    ) -> torch.Tensor:
        """The UNet's cross-attention context for a batch of B = P · N images: (B, L, D), or (2B, L, D) ordered
        [uncond, cond] with guidance, so that one UNet call serves both branches."""
        cond, uncond = self._text_embeddings(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_guidance
        )
        # prompt-major batch: [p0, p0, p1, p1] for N = 2, as diffusers
        context = cond.repeat_interleave(num_images_per_prompt, dim=0)
        if do_guidance:
            context = torch.cat([uncond.repeat_interleave(num_images_per_prompt, dim=0), context])
        return context

    def _guided_prediction(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        extra_channels: torch.Tensor | None = None,
        guide: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        step: int = 0,
    ) -> torch.Tensor:
        """The model output at z_t (step `step` of the chain), classifier-free guided when the context holds both
        branches (table above).

        latents: z_t (B, C, h, w); context: (B, L, D), or (2B, L, D) as [uncond, cond]; extra_channels: (B, C', h,
        w) appended to the scaled input along channels (an inpainting UNet's mask and masked-image latents);
        guide(scaled z_t, t, output) -> output shifts the guided output (classifier guidance, `_classifier_shift`).
        """
        do_guidance = context.shape[0] == 2 * latents.shape[0]
        model_input = torch.cat([latents, latents]) if do_guidance else latents
        model_input = self.scheduler.scale_model_input(model_input, t)  # z_t as the model sees it
        scaled_latents = model_input[: latents.shape[0]]
        if extra_channels is not None:
            extra = torch.cat([extra_channels, extra_channels]) if do_guidance else extra_channels
            model_input = torch.cat([model_input, extra], dim=1)
        model_output = self._unet_output(model_input, t, context, step)
        if do_guidance:
            model_output_uncond, model_output_cond = model_output.chunk(2)
            model_output = model_output_uncond + guidance_scale * (model_output_cond - model_output_uncond)
            if guidance_rescale > 0.0:
                model_output = rescale_guidance(model_output, model_output_cond, guidance_rescale)
        return model_output if guide is None else guide(scaled_latents, t, model_output)

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        guidance_scale: float,
        guidance_rescale: float,
        generator: torch.Generator | list[torch.Generator] | None,
        eta: float,
        callback_on_step_end: Callable[..., dict | None] | None = None,
        extra_channels: torch.Tensor | None = None,
        after_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        guide: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The denoising loop every pipeline shares: z_t -> z_{t'} over `timesteps` (a tail of the scheduler's own).

        latents: the z at the first of `timesteps`, (B, C, h, w); extra_channels: see `_guided_prediction`;
        after_step(t, z_{t'}) -> z_{t'} runs after each sampler step (inpainting re-imposes the known region there);
        guide: see `_guided_prediction`. Any diffusers scheduler drives the loop (`_step_kwargs`).
        Returns z at the end of the chain, (B, C, h, w).
        """
        step_kwargs, per_image_noise = self._step_kwargs(generator, eta)
        with tqdm(total=len(timesteps), **self._progress_bar_config) as progress_bar:
            for i, t in enumerate(timesteps):
                model_output = self._guided_prediction(
                    latents, t, context, guidance_scale, guidance_rescale, extra_channels, guide, i
                )
                if per_image_noise:  # per-image generators: draw the step's noise here, image by image
                    step_kwargs["variance_noise"] = randn(
                        latents.shape, generator, latents.device, latents.dtype
                    )
                latents = self.scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
                if after_step is not None:
                    latents = after_step(t, latents)
                if callback_on_step_end is not None:
                    latents = _callback_latents(
                        callback_on_step_end(self, i, t, {"latents": latents}), latents, i
                    )
                progress_bar.update()
        validation.check_finite_tensor(
            "the denoised latents",
            latents,
            "the UNet's output overflowed or its weights hold NaN/inf: run in float32, or check the unet/ weights.",
        )
        return latents

    def _unet_output(
        self, model_input: torch.Tensor, t: torch.Tensor, context: torch.Tensor, i: int
    ) -> torch.Tensor:
        """The UNet's prediction at step i (a subclass adds its conditioning here: `ControlNetPipeline`)."""
        return self.unet(model_input, t, context)

    def _class_labels(
        self,
        classifier: torch.nn.Module | None,
        scale: float,
        class_labels: Mapping[str, int | Sequence[int] | torch.Tensor] | None,
        batch_size: int,
    ) -> dict[str, torch.Tensor] | None:
        """The target labels as (B,) tensors when classifier guidance is on, else None; errors name the argument."""
        if classifier is None:
            if class_labels is not None:
                raise ValueError("class_labels were given without a classifier; pass classifier=... as well.")
            return None
        if class_labels is None:
            raise ValueError(
                "classifier guidance needs class_labels: the target class of each attribute the classifier "
                f"predicts ({', '.join(name for name, _ in classifier.config.attributes)})."
            )
        labels = check_class_labels(classifier, class_labels, batch_size, self.device)
        return labels if scale != 0.0 else None

    def _classifier_shift(
        self,
        classifier: torch.nn.Module,
        labels: dict[str, torch.Tensor],
        scale: float,
        scaled_latents: torch.Tensor,
        t: torch.Tensor,
        model_output: torch.Tensor,
    ) -> torch.Tensor:
        """Classifier guidance (Dhariwal & Nichol 2021): the model output shifted by s·√(1 − ᾱ_t)·∇ log p(y | z_t)
        in its prediction type's form (`pipelines.classifier_guidance.guide_model_output`)."""
        gradient = log_prob_gradient(classifier, scaled_latents, t, labels)
        alpha_prod = alpha_prod_at(self.scheduler.alphas_cumprod, t)
        return guide_model_output(
            model_output, gradient, alpha_prod, self.scheduler.config.prediction_type, scale
        )

    def _step_kwargs(
        self, generator: torch.Generator | list[torch.Generator] | None, eta: float
    ) -> tuple[dict[str, Any], bool]:
        """The keyword arguments this scheduler's `step` takes, and whether the loop draws per-image noise.

        Any diffusers scheduler works: `eta` goes only to a step that takes it (DDIM), the generator only to one
        that draws noise. A list of generators is drawn from here, image by image, when the step takes
        `variance_noise`; otherwise the list goes to the step (diffusers' schedulers draw from lists themselves).
        """
        accepted = inspect.signature(self.scheduler.step).parameters
        per_image_noise = isinstance(generator, list) and "variance_noise" in accepted
        step_kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            step_kwargs["eta"] = eta
        elif eta > 0:
            logger.warning("eta=%s is ignored: %s.step takes no eta.", eta, type(self.scheduler).__name__)
        if "generator" in accepted and not per_image_noise:
            step_kwargs["generator"] = generator
        return step_kwargs, per_image_noise

    def resolve_sampling(
        self, num_inference_steps: int | None = None, guidance_scale: float | None = None
    ) -> tuple[int, float]:
        """(steps, guidance) a call uses: each as given, else the carried sampling settings', else diffusers'."""
        sources = (self.sampling_settings, DIFFUSERS_DEFAULTS)
        if num_inference_steps is None:
            num_inference_steps = next(
                s.num_inference_steps for s in sources if s.num_inference_steps is not None
            )
        if guidance_scale is None:
            guidance_scale = next(s.guidance_scale for s in sources if s.guidance_scale is not None)
        return num_inference_steps, guidance_scale

    def _check_scalars(
        self,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_rescale: float,
        num_images: int,
        eta: float,
    ) -> None:
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}.")
        if not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is out of range: pass 1 .. {num_train_timesteps} "
                "(the scheduler's num_train_timesteps)."
            )
        validation.check_finite("guidance_scale", guidance_scale, "7.5")
        validation.check_finite("guidance_rescale", guidance_rescale, "0.7")
        validation.check_finite("eta", eta, "0.0")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale={guidance_rescale} must be in [0, 1] (0 turns it off).")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images_per_prompt={num_images!r} must be an int >= 1.")
        if eta < 0.0:
            raise ValueError(f"eta={eta} must be >= 0 (0: deterministic DDIM, 1: DDPM-like variance).")

    def _check_unet_takes_latents(self) -> None:
        """A UNet whose input is more than the latents (an SD-inpainting UNet) cannot run this pipeline."""
        latent_channels = self.vae.config.latent_channels
        if self.unet.config.in_channels != latent_channels:
            raise ValueError(
                f"the UNet takes {self.unet.config.in_channels} input channels but the VAE's latents have "
                f"{latent_channels}: an inpainting UNet ({2 * latent_channels + 1} channels: latents, mask, "
                "masked-image latents) runs in LatentInpaintPipeline, with an image and a mask."
            )

    def _check_output(self, output_type: str, callback_on_step_end) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {', '.join(OUTPUT_TYPES)}.")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(
                f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}."
            )

    def _text_embeddings(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        do_guidance: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond, uncond) embeddings, each (P, L, D) in the UNet's dtype and device; uncond is None without guidance."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt (a str or list of str) and prompt_embeds (P, L, D).")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds.")
        prompts = _as_prompt_list(prompt, "prompt") if prompt is not None else None
        num_prompts = (
            len(prompts)
            if prompts is not None
            else self._check_prompt_embeds(prompt_embeds, "prompt_embeds").shape[0]
        )
        if negative_prompt_embeds is not None and do_guidance:
            self._check_prompt_embeds(negative_prompt_embeds, "negative_prompt_embeds")
        negatives = None
        if do_guidance and negative_prompt_embeds is None:
            negatives = _as_prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * num_prompts
            elif len(negatives) != num_prompts:
                raise ValueError(
                    f"negative_prompt has {len(negatives)} entries but prompt has {num_prompts}: pass one "
                    f"negative prompt (a str, used for all) or a list of {num_prompts}."
                )
        # one text-encoder batch for everything to encode: [negatives..., prompts...]
        texts = self.maybe_convert_prompt((negatives or []) + (prompts or []))  # multi-vector placeholders
        self._warn_unknown_words(texts)
        encoded = encode_prompts(self.tokenizer, self.text_encoder, texts) if texts else None
        if prompts is not None:
            prompt_embeds = encoded[len(negatives or []) :]
        uncond = None
        if do_guidance:
            uncond = encoded[: len(negatives)] if negatives is not None else negative_prompt_embeds
            if uncond.shape != prompt_embeds.shape:
                raise ValueError(
                    f"the negative embeddings (negative_prompt_embeds or encoded negative_prompt) have shape "
                    f"{tuple(uncond.shape)} but the prompt embeddings have {tuple(prompt_embeds.shape)}; they must "
                    "match."
                )
            uncond = uncond.to(device=self.device, dtype=self.dtype)
        return prompt_embeds.to(device=self.device, dtype=self.dtype), uncond

    def _check_prompt_embeds(self, embeds: torch.Tensor, name: str) -> torch.Tensor:
        """A (P, L, D) tensor of finite values, D the UNet's cross_attention_dim."""
        embeds = _check_embeds(embeds, name)
        width = self.unet.config.cross_attention_dim
        if embeds.shape[-1] != width:
            raise ValueError(
                f"{name} has shape {tuple(embeds.shape)} but this UNet reads text embeddings of width {width} "
                "(its cross_attention_dim); encode the prompts with this pipeline's own text encoder."
            )
        validation.check_finite_tensor(name, embeds, "pass finite embeddings.")
        return embeds

    def _warn_unknown_words(self, texts: list[str]) -> None:
        """Warn, naming them, about words a closed-vocabulary model (the embedded default) does not know."""
        vocabulary = closed_vocabulary(self.tokenizer)
        if vocabulary is None:
            return
        added = self.tokenizer.added_tokens_encoder  # placeholders of textual inversion are words it knows
        texts = [" ".join(word for word in text.split() if word not in added) for text in texts]
        unknown = list(dict.fromkeys(w for text in texts for w in unknown_words(text, vocabulary)))
        if unknown:
            logger.warning(
                "this model's vocabulary lacks %s: the text encoder reads them as letter pieces it never learned, "
                "so the image will not follow them; the words it knows: %s",
                ", ".join(repr(w) for w in unknown),
                ", ".join(sorted(w for w in vocabulary if len(w) > 1)),
            )

    def _initial_latents(
        self,
        batch_size: int,
        height: int | None,
        width: int | None,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """z_T: given or drawn standard normal, times the sampler's init_noise_sigma; (B, C, h, w)."""
        vae_factor = vae_scale_factor(self.vae)
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
                raise ValueError(f"latents must be a (B, C, h, w) tensor, got {_describe(latents)}.")
            height = latents.shape[2] * vae_factor if height is None else height
            width = latents.shape[3] * vae_factor if width is None else width
        default_side = self.unet.config.sample_size * vae_factor
        height = default_side if height is None else height
        width = default_side if width is None else width
        validation.check_image_size(height, width, default_side, vae_factor * self.unet.downsample_factor)
        shape = (batch_size, self.vae.config.latent_channels, height // vae_factor, width // vae_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator is a list of {len(generator)} but the batch has {batch_size} images "
                "(prompts × num_images_per_prompt): pass one generator or one per image."
            )
        if latents is None:
            latents = randn(shape, generator, self.device, self.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"latents has shape {tuple(latents.shape)} but this call needs {shape} (batch = prompts × "
                "num_images_per_prompt, VAE latent_channels, height / VAE factor, width / VAE factor)."
            )
        else:
            validation.check_finite_tensor(
                "latents", latents, "pass standard normal noise, e.g. torch.randn."
            )
        latents = latents.to(device=self.device, dtype=self.dtype)
        return latents * self.scheduler.init_noise_sigma

    def _to_output(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        return self._images_as(self._decode(latents), output_type)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> float32 images (B, 3, H, W) in [0, 1]."""
        decoded = decode_latents(self.vae, latents).float()
        validation.check_finite_tensor(
            "the image the VAE decoded from finite latents",
            decoded,
            "its weights are damaged or it overflowed: check the vae/ weights or run in float32.",
        )
        return (decoded / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]

    @staticmethod
    def _images_as(images: torch.Tensor, output_type: str):
        """Images (B, 3, H, W) in [0, 1] as `output_type` ("pt", "np" or "pil"; see `PipelineOutput`)."""
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
        if output_type == "np":
            return images
        return [PIL.Image.fromarray(image) for image in (images * 255).round().astype(np.uint8)]


# ------------------------------------------------------------------------------------------- module helpers


def _as_prompt_list(prompt: str | list[str], name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"{name} must be a str or a list of str, got {_describe(prompt)}.")
    if len(prompt) == 0:
        raise ValueError(f"{name} is an empty list: pass at least one prompt.")
    return list(prompt)


def _check_embeds(embeds: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] == 0:
        raise ValueError(f"{name} must be a (P, L, D) tensor with P >= 1, got {_describe(embeds)}.")
    return embeds


def _callback_latents(returned: dict | None, latents: torch.Tensor, step: int) -> torch.Tensor:
    """The latents after callback_on_step_end: its returned "latents" if any, which must keep their shape."""
    if returned is not None and not isinstance(returned, dict):
        raise TypeError(
            f"callback_on_step_end returned {_describe(returned)} at step {step}; return None or a dict such as "
            '{"latents": latents}.'
        )
    replaced = (returned or {}).get("latents", latents)
    if not isinstance(replaced, torch.Tensor) or replaced.shape != latents.shape:
        raise ValueError(
            f"callback_on_step_end returned latents of {_describe(replaced)} at step {step}, but the latents have "
            f"shape {tuple(latents.shape)}; return latents of the same shape (to change the image size, pass "
            "height and width)."
        )
    return replaced


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:200]


def _no_latent_clipping(scheduler):
    """The scheduler with `clip_sample` off, as diffusers' `StableDiffusionPipeline.__init__` sets it.

    Clamping x̂₀ to [−1, 1] is meant for pixel-space models; latents are not bounded by 1, and diffusers' pipeline turns
    the option off (with a FutureWarning) on any scheduler given to it. Doing the same here makes a scheduler built
    with diffusers' defaults (`DDIMScheduler.from_config(pndm_config)`: clip_sample=True) draw the same images in
    both pipelines. Works on diffusers' schedulers (ConfigMixin) and this project's (a dataclass config).
    """
    if getattr(scheduler.config, "clip_sample", False) is not True:
        return scheduler
    logger.warning(
        "%s has clip_sample=True, which clamps the predicted latents to [-1, 1] (meant for pixels): turned off, as "
        "diffusers' StableDiffusionPipeline does. Set clip_sample=False in the scheduler config to silence this.",
        type(scheduler).__name__,
    )
    if hasattr(scheduler, "register_to_config"):  # diffusers' ConfigMixin keeps its config in a frozen dict
        scheduler.register_to_config(clip_sample=False)
    else:
        scheduler.config = dataclasses.replace(scheduler.config, clip_sample=False)
    return scheduler


def _constructor_prompt(text: str | list[str] | tuple[str, ...], prompt: Any) -> str | list[str]:
    """The prompt of `LatentPipeline("a prompt")`; a model folder or hub id there is refused, never guessed."""
    if prompt is not None:
        raise TypeError("LatentPipeline got a prompt twice: positionally and as prompt=.")
    for item in [text] if isinstance(text, str) else text:
        if isinstance(item, str) and (Path(item).exists() or re.fullmatch(r"[\w.-]+/[\w.-]+", item)):
            raise ValueError(
                f"LatentPipeline({item!r}): that names a model folder or hub id, not a prompt; load a model with "
                f"LatentPipeline.from_pretrained({item!r}). LatentPipeline('a prompt') takes a prompt for the "
                "embedded default."
            )
    return _as_prompt_list(text, "prompt") if not isinstance(text, str) else text
