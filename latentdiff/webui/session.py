"""One model in memory for the web page: what it offers (samplers, adapters, sizes, its defaults) and the runs.

`ModelSession` loads the pipeline once and is then driven by a single worker thread (`jobs.JobQueue`), so the
sampler swap, the adapter weights and the sampling of one request never interleave with another's. Pipelines are
imported inside the methods that need them (DESIGN.md: entry points import pipelines/ lazily).

Samplers come from the project's registry, `latentdiff.schedulers.SAMPLERS` (ddim, ddpm, euler, euler_a, heun,
dpmpp_2m, dpmpp_2m_sde), each built on the model's own scheduler config; a sampler added there appears in the page with
no change here. LoRA adapters come from one folder given at start (`lora_dir`): its `.safetensors` files and adapter folders,
offered by name; the page can only pick among those names.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentdiff.validation import MAX_SIDE_FACTOR, random_seed
from latentdiff.webui.forms import Choices, EditImage, TextToImage

logger = logging.getLogger(__name__)

# The editing pipelines the edit panel drives, by their names in `pipelines` (absent in this version).
EDIT_PIPELINES = {"img2img": "LatentImg2ImgPipeline", "inpaint": "LatentInpaintPipeline"}

Progress = Callable[[int, int], None]  # (steps done, steps in all)


@dataclass(frozen=True)
class GeneratedImage:
    """One result: the PNG file's bytes (generation settings in its text chunks), its seed and the `parameters`
    text the Stable Diffusion web UIs write."""

    png: bytes
    seed: int
    parameters: str


def sampler_choices() -> list[dict[str, Any]]:
    """The page's sampler menu: each registry name, its label as the web UIs write it, whether it takes Karras σ."""
    from latentdiff.images import webui_sampler_name
    from latentdiff.schedulers.registry import KARRAS_SAMPLERS, SAMPLERS

    return [
        {"name": name, "label": webui_sampler_name(name), "karras": name in KARRAS_SAMPLERS}
        for name in SAMPLERS
    ]


def list_adapters(lora_dir: Path | None) -> dict[str, Path]:
    """Adapter name -> path for the LoRA adapters directly inside `lora_dir` (a `.safetensors` file, or a folder
    that `latentdiff.lora.find_lora_file` accepts); hidden entries are skipped. Empty without a folder."""
    from latentdiff.lora import find_lora_file

    if lora_dir is None:
        return {}
    adapters = {}
    for entry in sorted(lora_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        try:
            find_lora_file(entry)
        except (FileNotFoundError, ValueError):
            continue
        adapters[entry.name] = entry
    return adapters


def editing_pipeline(kind: str) -> type | None:
    """The editing pipeline class for "img2img" or "inpaint", or None when this version has none."""
    import pipelines

    return getattr(pipelines, EDIT_PIPELINES[kind], None)


class ModelSession:
    """The one pipeline the server holds.

    Args:
        model: a diffusers Stable Diffusion folder or hub id; None: the embedded default.
        lora_dir: the folder whose adapters the page may use; None: no adapters.
        device: where to sample ("cpu", "cuda"); None: the best device there is, as `latentdiff generate` picks it.
    """

    def __init__(
        self, model: str | None = None, lora_dir: str | os.PathLike | None = None, device: str | None = None
    ):
        self.model = model
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.device = device
        self._pipe = None
        self._load_lock = threading.Lock()
        self._adapter_names: dict[str, str] = {}  # adapter (file) name -> the pipeline's adapter name
        self._folder_scheduler = None
        self._sampler: tuple[str, bool] | None = None  # the (name, karras) pipe.scheduler was built as
        self.load_error: str | None = None  # why loading failed, once it has

    @property
    def model_name(self) -> str:
        return self.model or "embedded default"

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def load(self):
        """Load the pipeline once (later calls return it); thread-safe."""
        with self._load_lock:
            if self.load_error is not None:
                raise ValueError(self.load_error)
            if self._pipe is None:
                from pipelines.latent_pipeline import LatentPipeline

                try:
                    pipe = (
                        LatentPipeline() if self.model is None else LatentPipeline.from_pretrained(self.model)
                    )
                except Exception as error:
                    self.load_error = f"the model {self.model_name!r} could not be loaded: {error}"
                    raise ValueError(self.load_error) from error
                if self.device is None:  # chosen here, not at start: the page is served before torch loads
                    from latentdiff.cli import _best_device

                    self.device = _best_device()
                pipe.to(device=self.device)
                pipe.set_progress_bar_config(disable=True)
                self._folder_scheduler = (
                    pipe.scheduler
                )  # requests swap pipe.scheduler; defaults read this one
                self._pipe = pipe
                logger.info("loaded %s", self.model_name)
            return self._pipe

    # ------------------------------------------------------------------------------ what the page offers

    def native_side(self) -> int:
        from latentdiff.conditioning import vae_scale_factor

        pipe = self.load()
        return pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)

    def choices(self) -> Choices:
        """The options and bounds the form is checked against (the adapters folder is read again each time)."""
        from latentdiff.conditioning import vae_scale_factor

        pipe = self.load()
        return Choices(
            samplers=tuple(choice["name"] for choice in sampler_choices()),
            karras_samplers=tuple(choice["name"] for choice in sampler_choices() if choice["karras"]),
            adapters=tuple(list_adapters(self.lora_dir)),
            size_multiple=vae_scale_factor(pipe.vae) * pipe.unet.downsample_factor,
            max_side=MAX_SIDE_FACTOR * self.native_side(),  # as `latentdiff generate` allows
            max_steps=self._folder_scheduler.config.num_train_timesteps,
        )

    def defaults(self) -> dict[str, Any]:
        """The form's starting values: the settings the model carries (its folder's `sampling_settings.json`), else
        diffusers' defaults and the sampler its folder's scheduler config names; its native size."""
        pipe = self.load()
        steps, guidance = pipe.resolve_sampling()
        from latentdiff.schedulers.registry import SAMPLERS

        folder_sampler = next(
            (name for name, (cls, _) in SAMPLERS.items() if type(self._folder_scheduler) is cls), "ddim"
        )
        side = self.native_side()
        return {
            "sampler": pipe.sampling_settings.sampler or folder_sampler,
            "steps": steps,
            "guidance": guidance,
            "width": side,
            "height": side,
            "num_images": 1,
            "seed": "random",
            "karras": bool(getattr(self._folder_scheduler.config, "use_karras_sigmas", False)),
        }

    # ----------------------------------------------------------------------------------------- the runs

    def text_to_image(self, request: TextToImage, progress: Progress | None = None) -> list[GeneratedImage]:
        """Sample `request.num_images` images (image i with seed + i, as `latentdiff generate`)."""
        return self._sample(request, progress)

    def edit(self, request: EditImage, progress: Progress | None = None) -> list[GeneratedImage]:
        """Image-to-image (no mask) or inpainting (mask) with the editing pipelines, in diffusers' call signature.

        Raises NotImplementedError when this version has no editing pipelines."""
        if editing_pipeline("inpaint" if request.mask is not None else "img2img") is None:
            raise NotImplementedError(
                "image-to-image and inpainting are not available in this version of latentdiff."
            )
        return self._sample(request.settings, progress, request)

    def _sample(
        self, request: TextToImage, progress: Progress | None, edit: EditImage | None = None
    ) -> list[GeneratedImage]:
        import torch

        pipe = self.load()
        self._use_sampler(request.sampler, request.karras)
        self._use_adapters(request.loras)
        seed = request.seed if request.seed is not None else random_seed()
        settings = self._settings(request)
        runner, extra = pipe, {}
        if edit is not None:  # an editing pipeline over the same parts, the sampler just chosen included
            runner = editing_pipeline("inpaint" if edit.mask is not None else "img2img")(
                pipe.unet, pipe.scheduler, pipe.vae, pipe.text_encoder, pipe.tokenizer
            )
            runner.set_progress_bar_config(disable=True)
            extra = {"image": edit.image, "strength": edit.strength}
            if edit.mask is not None:
                extra["mask_image"] = edit.mask
            settings["strength"] = str(edit.strength)

        def on_step_end(pipeline, i: int, t, tensors: dict) -> None:
            if progress is not None:
                progress(i + 1, len(pipeline.scheduler.timesteps))

        images = runner(
            request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            num_images_per_prompt=request.num_images,
            height=request.height,
            width=request.width,
            generator=[torch.Generator().manual_seed(seed + i) for i in range(request.num_images)],
            callback_on_step_end=on_step_end,
            **extra,
        ).images
        return [_encode(image, {**settings, "seed": str(seed + i)}) for i, image in enumerate(images)]

    def _use_sampler(self, name: str, karras: bool) -> None:
        """Sampler `name` on the folder's scheduler config (rebuilt only when the choice changes)."""
        from latentdiff.schedulers.registry import sampler_from_config

        if self._sampler != (name, karras):
            self.load().scheduler = sampler_from_config(name, self._folder_scheduler.config, karras)
            self._sampler = (name, karras)

    def _use_adapters(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Load each requested adapter once (kept loaded), then apply exactly the requested ones."""
        pipe = self.load()
        if not loras:
            if self._adapter_names:
                pipe.disable_lora()
            return
        paths = list_adapters(self.lora_dir)
        for name, _ in loras:
            if name not in paths:
                raise FileNotFoundError(f"loras: the adapter {name!r} is no longer in the adapters folder.")
            if name not in self._adapter_names:
                self._adapter_names[name] = pipe.load_lora_weights(
                    paths[name], adapter_name=f"webui_{len(self._adapter_names)}"
                )
        pipe.enable_lora()
        pipe.set_adapters([self._adapter_names[name] for name, _ in loras], [scale for _, scale in loras])

    def _settings(self, request: TextToImage) -> dict[str, str]:
        """The PNG text chunks `latentdiff generate` writes, plus size and adapters."""
        settings = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "model": self.model_name,
            "steps": str(request.steps),
            "guidance": str(request.guidance),
            "sampler": request.sampler,
            "karras": str(request.karras),
            "eta": "0.0",
            "size": f"{request.width}x{request.height}",
        }
        if request.loras:
            settings["lora"] = ", ".join(f"{name}:{scale:g}" for name, scale in request.loras)
        return settings


def _encode(image, settings: dict[str, str]) -> GeneratedImage:
    """PNG bytes with the text chunks `latentdiff generate` writes: one per setting and the web UIs' `parameters`."""
    from latentdiff.images import png_text, webui_parameters

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_text(settings))
    return GeneratedImage(
        png=buffer.getvalue(), seed=int(settings["seed"]), parameters=webui_parameters(settings)
    )
