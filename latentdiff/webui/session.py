"""One model in memory for the web page: what it offers (samplers, adapters, sizes, its defaults) and the runs.

`ModelSession` loads the pipeline once and is then driven by a single worker thread (`jobs.JobQueue`), so the
sampler swap, the adapter weights and the sampling of one request never interleave with another's. Pipelines are
imported inside the methods that need them (DESIGN.md: entry points import pipelines/ lazily).

Samplers come from a registry, `sampler_registry()`: every scheduler class `latentdiff.schedulers` exports, keyed by
its name without "Scheduler", lower case ("ddim", "ddpm"); a sampler added there appears in the page with no change
here. LoRA adapters come from one folder given at start (`lora_dir`): its `.safetensors` files and adapter folders,
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

from latentdiff.webui.forms import Choices, EditImage, TextToImage

logger = logging.getLogger(__name__)

# When the model folder carries no sampling settings: the CLI's defaults, at which the README measures the default.
FALLBACK_STEPS = 25
FALLBACK_GUIDANCE = 5.0
MAX_SIDE_FACTOR = 4  # largest image side = 4 × the model's native side (256 px for the 64 px default)
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


def sampler_registry() -> dict[str, type]:
    """Sampler name -> scheduler class, for every scheduler class `latentdiff.schedulers` exports."""
    import latentdiff.schedulers as schedulers
    from latentdiff.schedulers.base import Scheduler

    registry = {}
    for name in schedulers.__all__:
        cls = getattr(schedulers, name)
        if isinstance(cls, type) and issubclass(cls, Scheduler) and cls is not Scheduler:
            registry[name.removesuffix("Scheduler").lower()] = cls
    return registry


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
        device: where to sample ("cpu", "cuda").
    """

    def __init__(
        self, model: str | None = None, lora_dir: str | os.PathLike | None = None, device: str = "cpu"
    ):
        self.model = model
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.device = device
        self._pipe = None
        self._load_lock = threading.Lock()
        self._adapter_names: dict[str, str] = {}  # adapter (file) name -> the pipeline's adapter name
        self._folder_scheduler = None
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
            samplers=tuple(sampler_registry()),
            adapters=tuple(list_adapters(self.lora_dir)),
            size_multiple=vae_scale_factor(pipe.vae) * pipe.unet.downsample_factor,
            max_side=MAX_SIDE_FACTOR * self.native_side(),
            max_steps=self._folder_scheduler.config.num_train_timesteps,
        )

    def defaults(self) -> dict[str, Any]:
        """The form's starting values: the settings the model carries (`pipe.sampling_settings`, when this version's
        pipeline reads them from the folder), else FALLBACK_*, the sampler its folder names, its native size."""
        carried = getattr(self.load(), "sampling_settings", None)
        registry = sampler_registry()
        folder_sampler = next(
            (name for name, cls in registry.items() if type(self._folder_scheduler) is cls),
            next(iter(registry)),
        )
        side = self.native_side()
        return {
            "sampler": getattr(carried, "sampler", None) or folder_sampler,
            "steps": getattr(carried, "num_inference_steps", None) or FALLBACK_STEPS,
            "guidance": getattr(carried, "guidance_scale", None) or FALLBACK_GUIDANCE,
            "width": side,
            "height": side,
            "num_images": 1,
            "seed": "random",
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
        self._use_sampler(request.sampler)
        self._use_adapters(request.loras)
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "little")
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

    def _use_sampler(self, name: str) -> None:
        pipe = self.load()
        sampler_class = sampler_registry()[name]
        if type(pipe.scheduler) is not sampler_class:
            pipe.scheduler = sampler_class.from_config(self._folder_scheduler.config)

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
            "eta": "0.0",
            "size": f"{request.width}x{request.height}",
        }
        if request.loras:
            settings["lora"] = ", ".join(f"{name}:{scale:g}" for name, scale in request.loras)
        return settings


def webui_parameters(settings: dict[str, str]) -> str:
    """The `parameters` text of the Stable Diffusion web UIs (AUTOMATIC1111 and the tools that read it):

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 25, Sampler: DDIM, CFG scale: 5.0, Seed: 42, Size: 64x64, Model: embedded default
    """
    lines = [settings["prompt"]]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = {
        "Steps": settings["steps"],
        "Sampler": sampler_registry()[settings["sampler"]].__name__.removesuffix("Scheduler"),
        "CFG scale": settings["guidance"],
        "Seed": settings["seed"],
        "Size": settings["size"],
        "Model": settings["model"],
        "Lora": settings.get("lora"),
        "Denoising strength": settings.get("strength"),
    }
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items() if value))
    return "\n".join(lines)


def _encode(image, settings: dict[str, str]) -> GeneratedImage:
    """PNG bytes with one text chunk per setting (the CLI's keys) and the web UIs' `parameters` chunk."""
    from PIL.PngImagePlugin import PngInfo

    parameters = webui_parameters(settings)
    info = PngInfo()
    for key, value in {**settings, "parameters": parameters}.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return GeneratedImage(png=buffer.getvalue(), seed=int(settings["seed"]), parameters=parameters)
