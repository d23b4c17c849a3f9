"""`latentdiff bench --edits`: ShapesBench edits (latentdiff/eval/edits.py) run with the editing pipelines.

An entry point like cli.py: it imports the pipelines inside the functions that need them (latentdiff/eval knows
nothing of them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def bench_edits(args: argparse.Namespace) -> int:
    """`latentdiff bench --edits`: the edit table (or, with --inversion-steps, the inversion PSNR table)."""
    from latentdiff import validation
    from latentdiff.conditioning import vae_scale_factor
    from latentdiff.eval import edits
    from latentdiff.eval.shapesbench import save_grid
    from latentdiff.generate import load_pipeline
    from pipelines.latent_pipeline import LatentPipeline

    loras = [validation.parse_lora_spec(spec) for spec in args.lora]
    pipe = load_pipeline(LatentPipeline, args.model, args.sampler, args.karras, loras, "cpu", None)
    pipe.set_progress_bar_config(disable=True)
    steps, guidance = pipe.resolve_sampling(args.steps, args.guidance)  # the carried settings unless given
    vae_factor = vae_scale_factor(pipe.vae)
    size = pipe.unet.config.sample_size * vae_factor
    kinds = _edit_kinds(args.edit_kinds, pipe.unet.config.in_channels != pipe.vae.config.latent_channels)
    cases = edits.edit_cases(kinds, per_kind=args.edit_cases, size=size, grid=vae_factor)
    settings = {
        "model": args.model or "embedded default",
        "sampler": args.sampler or type(pipe.scheduler).__name__,
        "steps": steps,
        "guidance_scale": guidance,
        "recolour_strength": args.strength,
        "invert_guidance_scale": args.invert_guidance,
    }
    if args.inversion_steps:
        return _print_inversion_psnr(
            pipe, [c for c in cases if c.kind == "invert"], args.inversion_steps, size
        )
    edit_fn = edit_bench_fn(pipe, steps, guidance, args.strength, args.invert_guidance)
    result, images = edits.run_edit_bench(edit_fn, cases, size=size, settings=settings)
    print(edits.format_edit_table(result))
    if args.grid:
        shown = [
            i for kind in edits.EDIT_KINDS for i in [j for j, c in enumerate(cases) if c.kind == kind][:3]
        ]
        pictures = [p for i in shown for p in (cases[i].start_image(size), images[i])]
        captions = [t for i in shown for t in (f"{cases[i].kind}: {cases[i].source_prompt}", cases[i].target)]
        save_grid(pictures, captions, args.grid, columns=6)
        print(f"saved before/after pairs to {args.grid}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _edit_kinds(flag: str | None, inpainting_unet: bool) -> tuple[str, ...]:
    """The kinds --edit-kinds names (default: all; the inpainting ones for an inpainting UNet, which cannot run
    image-to-image or inversion)."""
    from latentdiff.eval.edits import EDIT_KINDS, INPAINT_KINDS

    if flag is None:
        return tuple(INPAINT_KINDS) if inpainting_unet else EDIT_KINDS
    kinds = tuple(kind.strip() for kind in flag.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in EDIT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"--edit-kinds={flag!r}: name some of {', '.join(EDIT_KINDS)}, separated by commas.")
    if inpainting_unet and not set(kinds) <= set(INPAINT_KINDS):
        raise ValueError(
            f"--edit-kinds={flag!r}: the model's UNet is an inpainting UNet (latents, mask, masked-image latents), "
            f"which runs only the inpainting kinds: use --edit-kinds {','.join(INPAINT_KINDS)}."
        )
    return kinds


def _print_inversion_psnr(pipe, cases: list, steps_list: str, size: int) -> int:
    """DDIM inversion's reconstruction PSNR against steps on the invert cases' start scenes (guidance 1)."""
    import numpy as np
    import PIL.Image
    import torch

    from latentdiff.conditioning import decode_latents, encode_images
    from latentdiff.eval import edits

    def reconstruct(images: list, captions: list, steps: int) -> list:
        z_T = pipe.invert(images, captions, num_inference_steps=steps)
        return pipe(captions, latents=z_T, num_inference_steps=steps, guidance_scale=1.0).images

    def round_trip(images: list) -> list:
        pixels = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2) / 127.5 - 1
        with torch.no_grad():
            decoded = decode_latents(pipe.vae, encode_images(pipe.vae, pixels)).clamp(-1, 1)
        uint8 = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [PIL.Image.fromarray(a) for a in uint8]

    steps = [int(n) for n in steps_list.split(",")]
    result = edits.inversion_psnr(reconstruct, round_trip, steps, cases, size)
    print(f"DDIM inversion, {len(cases)} start scenes, guidance 1: PSNR (dB) of the reconstruction")
    print(f"{'steps':>6}{'to the image':>14}{'to its VAE round trip':>24}")
    for n in steps:
        print(f"{n:>6}{result[n]['psnr']:>14.2f}{result[n]['psnr_to_round_trip']:>24.2f}")
    print(f"VAE round trip to the image: {result['vae round trip']:.2f}")
    return 0


def edit_bench_fn(pipe, steps: int, guidance: float, strength: float, invert_guidance: float):
    """The edit function of ShapesBench edits (latentdiff.eval.edits) over a loaded LatentPipeline: recolour by
    image-to-image at `strength`, add and remove by inpainting (strength 1), invert by DDIM inversion (guidance 1)
    then sampling with the edited prompt at `invert_guidance`. Case i's noise comes from seed i."""
    import torch

    from latentdiff.conditioning import vae_scale_factor
    from pipelines import LatentImg2ImgPipeline, LatentInpaintPipeline

    img2img, inpaint = LatentImg2ImgPipeline.from_pipe(pipe), LatentInpaintPipeline.from_pipe(pipe)
    size = pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)

    def edit(kind: str, cases: list) -> list:
        images = [case.start_image(size) for case in cases]
        prompts = [case.prompt for case in cases]
        generators = [torch.Generator().manual_seed(case.seed) for case in cases]
        common = dict(num_inference_steps=steps, generator=generators)
        if kind == "recolour":
            return img2img(prompts, image=images, strength=strength, guidance_scale=guidance, **common).images
        if kind in ("add", "remove"):
            masks = [case.mask_image() for case in cases]
            return inpaint(prompts, image=images, mask_image=masks, guidance_scale=guidance, **common).images
        z_T = pipe.invert(images, [case.source_prompt for case in cases], num_inference_steps=steps)
        return pipe(prompts, latents=z_T, num_inference_steps=steps, guidance_scale=invert_guidance).images

    return edit
