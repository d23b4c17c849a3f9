"""The `latentdiff` command line: `latentdiff generate | edit | inpaint | make-dataset | bench`.

Each sub-command parses its flags here and calls one library function; heavy imports (torch, diffusers) happen only
inside the command that needs them, so `latentdiff --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latentdiff import __version__


def _lora_spec(text: str) -> tuple[str, float]:
    """Parse `PATH[:SCALE]` (the scale defaults to 1.0)."""
    path, sep, scale = text.rpartition(":")
    if sep and path and not scale.startswith(("/", "\\")):
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def _cmd_generate(args: argparse.Namespace) -> int:
    from latentdiff.generate import generate

    paths = generate(
        args.prompt,
        output=args.output,
        model=args.model,
        negative=args.negative,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        num_images=args.num_images,
        height=args.height,
        width=args.width,
        sampler=args.sampler,
        eta=args.eta,
        loras=[_lora_spec(spec) for spec in args.lora],
    )
    for path in paths:
        print(f"saved {path}")
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    from latentdiff.edit import edit_image, inpaint_image

    settings = dict(
        output=args.output,
        strength=args.strength,
        model=args.model,
        negative=args.negative,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        num_images=args.num_images,
        sampler=args.sampler,
        eta=args.eta,
        loras=[_lora_spec(spec) for spec in args.lora],
    )
    if args.command == "inpaint":
        paths = inpaint_image(args.image, args.mask, args.prompt, **settings)
    else:
        paths = edit_image(args.image, args.prompt, **settings)
    for path in paths:
        print(f"saved {path}")
    return 0


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The flags `generate`, `edit` and `inpaint` share."""
    parser.add_argument(
        "-o", "--output", default="out.png", help="PNG path (several images: a grid, or numbered files)"
    )
    parser.add_argument(
        "--model", default=None, help="SD-layout folder or hub id (default: the embedded model)"
    )
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--steps", type=int, default=25, help="number of sampling steps")
    parser.add_argument(
        "--guidance", type=float, default=5.0, help="classifier-free guidance scale (<= 1: off)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--num-images", type=int, default=1, help="images to generate for the prompt")
    parser.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="sampler")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    parser.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA adapter (repeatable)"
    )


def _cmd_make_dataset(args: argparse.Namespace) -> int:
    from latentdiff.data.shapes import write_shapes_dataset

    out = write_shapes_dataset(
        args.out,
        num_images=args.num_images,
        size=args.size,
        seed=args.seed,
        star_only=args.include_star_only,
        overwrite=args.overwrite,
        star_fraction=args.star_fraction,
        polygon_fraction=args.polygon_fraction,
    )
    print(f"wrote {args.num_images} images and metadata.jsonl to {out}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from latentdiff.conditioning import vae_scale_factor
    from latentdiff.eval import shapesbench
    from latentdiff.schedulers import DDIMScheduler, DDPMScheduler
    from pipelines.latent_pipeline import LatentPipeline

    if args.edits:
        from latentdiff.bench_edits import bench_edits

        return bench_edits(args)
    if args.prompts:  # read (and check) the prompt file before loading any model
        prompts = shapesbench.read_prompt_file(args.prompts)
    else:
        groups = (*shapesbench.GROUPS, shapesbench.STAR_GROUP) if args.star else shapesbench.GROUPS
        prompts = shapesbench.bench_prompts(groups)
    pipe = LatentPipeline() if args.model is None else LatentPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    sampler_class = DDPMScheduler if args.sampler == "ddpm" else DDIMScheduler
    if type(pipe.scheduler) is not sampler_class:
        pipe.scheduler = sampler_class.from_config(pipe.scheduler.config)
    for path, scale in (_lora_spec(spec) for spec in args.lora):
        pipe.load_lora_weights(path, scale=scale)

    def generate_fn(texts: list[str], seeds: list[int]) -> list:
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        return pipe(
            texts, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generators
        ).images

    settings = {
        "model": args.model or "embedded default",
        "sampler": args.sampler,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "lora": args.lora,
    }
    result = shapesbench.run_bench(
        generate_fn,
        prompts,
        vae=pipe.vae,
        image_size=pipe.unet.config.sample_size * vae_scale_factor(pipe.vae),
        settings=settings,
        grid_path=args.grid,
    )
    print(shapesbench.format_table(result))
    if args.grid:
        print(f"saved a sample grid to {args.grid}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description="Latent text-to-image diffusion.")
    parser.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", help="the text prompt")
    gen.add_argument(
        "-o", "--output", default="out.png", help="PNG path (several images: a grid, or numbered files)"
    )
    gen.add_argument("--model", default=None, help="SD-layout folder or hub id (default: the embedded model)")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--steps", type=int, default=25, help="number of sampling steps")
    gen.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (<= 1: off)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    gen.add_argument("--num-images", type=int, default=1, help="images to generate for the prompt")
    gen.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    gen.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim", help="sampler")
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    gen.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA adapter (repeatable)"
    )
    gen.set_defaults(func=_cmd_generate)

    edit = commands.add_parser("edit", help="image-to-image: redraw an image toward a prompt (SDEdit)")
    edit.add_argument("image", help="the image to edit (PNG in; its size is the output's)")
    edit.add_argument("prompt", help="the text the result should match")
    edit.add_argument(
        "--strength", type=float, default=0.6, help="0 keeps the image, 1 ignores it (default 0.6)"
    )
    _add_sampling_flags(edit)
    edit.set_defaults(func=_cmd_edit)

    inpaint = commands.add_parser("inpaint", help="repaint the white part of a mask; keep every other pixel")
    inpaint.add_argument("image", help="the image to inpaint (PNG)")
    inpaint.add_argument(
        "mask", help="a PNG of the image's size: white (255) repaint, black (0) keep, nothing else"
    )
    inpaint.add_argument("prompt", help="what the result should show (the whole scene's caption works best)")
    inpaint.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="1 repaints from noise; less keeps some of the masked part",
    )
    _add_sampling_flags(inpaint)
    inpaint.set_defaults(func=_cmd_edit)

    data = commands.add_parser("make-dataset", help="write a procedural dataset as an imagefolder")
    data.add_argument("world", choices=["shapes"], help="which world to render")
    data.add_argument("out", help="output folder (must be empty unless --overwrite)")
    data.add_argument("--num-images", type=int, default=10_000)
    data.add_argument("--size", type=int, default=64, help="canvas side in pixels (>= 32)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument(
        "--include-star-only", action="store_true", help="render star scenes (the LoRA demo data)"
    )
    data.add_argument(
        "--star-fraction",
        type=float,
        default=1.0,
        help="with --include-star-only: the share of star scenes, the rest base scenes (default 1.0: stars only)",
    )
    data.add_argument(
        "--polygon-fraction",
        type=float,
        default=0.0,
        help="the share of random-polygon scenes (captioned 'random polygons'): autoencoder training data only",
    )
    data.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty folder")
    data.set_defaults(func=_cmd_make_dataset)

    bench = commands.add_parser("bench", help="score a model on ShapesBench")
    bench.add_argument("--model", default=None, help="SD-layout folder (default: the embedded model)")
    bench.add_argument("--steps", type=int, default=25)
    bench.add_argument("--guidance", type=float, default=5.0)
    bench.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    bench.add_argument(
        "--prompts", default=None, help="a prompt file (one per line) instead of the fixed set"
    )
    bench.add_argument(
        "--star", action="store_true", help="also score the star prompts (the LoRA demonstration)"
    )
    bench.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA adapter (repeatable)"
    )
    bench.add_argument("--grid", default="shapesbench_grid.png", help="where to save a sample grid PNG")
    bench.add_argument(
        "--edits",
        action="store_true",
        help="score edits instead (recolour, add, remove, invert; see latentdiff/eval/edits.py)",
    )
    bench.add_argument("--edit-cases", type=int, default=24, help="with --edits: cases per edit kind")
    bench.add_argument(
        "--inversion-steps",
        default=None,
        metavar="N,N,...",
        help="with --edits: instead, DDIM inversion's reconstruction PSNR at these step counts",
    )
    bench.add_argument("--strength", type=float, default=0.7, help="with --edits: the recolour strength")
    bench.add_argument(
        "--invert-guidance",
        type=float,
        default=1.0,
        help="with --edits: guidance when sampling after inversion",
    )
    bench.add_argument("--json", default=None, help="write the results as JSON here")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"latentdiff {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
