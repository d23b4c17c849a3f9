"""The `latentdiff` command line: `latentdiff generate | make-dataset | bench`.

Each sub-command parses its flags here and calls one library function; heavy imports (torch, diffusers) happen only
inside the command that needs them, so `latentdiff --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latentdiff import __version__

# the default of --steps, --guidance and --sampler, said in their help
_CARRIED = " (default: the model's sampling_settings.json, else diffusers' 50 steps, guidance 7.5)"


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
    from latentdiff.eval.sweep import format_sweep_table, parse_sweep, plot_sweep, run_sweep
    from latentdiff.schedulers import DDIMScheduler, DDPMScheduler
    from pipelines.latent_pipeline import LatentPipeline

    sweep = parse_sweep(args.sweep) if args.sweep else None  # checked before loading any model
    if args.prompts:  # read (and check) the prompt file before loading any model
        prompts = shapesbench.read_prompt_file(args.prompts)
    else:
        groups = (*shapesbench.GROUPS, shapesbench.STAR_GROUP) if args.star else shapesbench.GROUPS
        prompts = shapesbench.bench_prompts(groups)
    pipe = LatentPipeline() if args.model is None else LatentPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.sampler is not None:  # an explicit sampler wins over the one the model carries
        sampler_class = DDPMScheduler if args.sampler == "ddpm" else DDIMScheduler
        if type(pipe.scheduler) is not sampler_class:
            pipe.scheduler = sampler_class.from_config(pipe.scheduler.config)
    steps, guidance = pipe.resolve_sampling(args.steps, args.guidance)
    for path, scale in (_lora_spec(spec) for spec in args.lora):
        pipe.load_lora_weights(path, scale=scale)

    def make_generate_fn(steps: int, guidance: float):
        def generate_fn(texts: list[str], seeds: list[int]) -> list:
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            return pipe(
                texts, num_inference_steps=steps, guidance_scale=guidance, generator=generators
            ).images

        return generate_fn

    settings = {
        "model": args.model or "embedded default",
        "sampler": args.sampler or type(pipe.scheduler).__name__,
        "steps": steps,
        "guidance_scale": guidance,
        "lora": args.lora,
    }
    image_size = pipe.unet.config.sample_size * vae_scale_factor(pipe.vae)
    if sweep is not None:
        name, values = sweep
        result = run_sweep(
            lambda v: make_generate_fn(v, guidance) if name == "steps" else make_generate_fn(steps, v),
            name,
            values,
            prompts,
            vae=pipe.vae,
            image_size=image_size,
            settings={**settings, {"guidance": "guidance_scale", "steps": "steps"}[name]: values},
        )
        print(format_sweep_table(result))
        print(f"saved the sweep plot to {plot_sweep(result, args.plot)}")
        return _write_json(result, args.json)
    result = shapesbench.run_bench(
        make_generate_fn(steps, guidance),
        prompts,
        vae=pipe.vae,
        image_size=image_size,
        settings=settings,
        grid_path=args.grid,
    )
    print(shapesbench.format_table(result))
    if args.grid:
        print(f"saved a sample grid to {args.grid}")
    return _write_json(result, args.json)


def _write_json(result: dict, path: str | None) -> int:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
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
    gen.add_argument("--steps", type=int, default=None, help=f"number of sampling steps{_CARRIED}")
    gen.add_argument(
        "--guidance", type=float, default=None, help=f"classifier-free guidance scale (<= 1: off){_CARRIED}"
    )
    gen.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    gen.add_argument("--num-images", type=int, default=1, help="images to generate for the prompt")
    gen.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    gen.add_argument("--sampler", choices=["ddim", "ddpm"], default=None, help=f"sampler{_CARRIED}")
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    gen.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA adapter (repeatable)"
    )
    gen.set_defaults(func=_cmd_generate)

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
    bench.add_argument("--steps", type=int, default=None, help=f"sampling steps{_CARRIED}")
    bench.add_argument("--guidance", type=float, default=None, help=f"guidance scale{_CARRIED}")
    bench.add_argument("--sampler", choices=["ddim", "ddpm"], default=None, help=f"sampler{_CARRIED}")
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
    bench.add_argument("--json", default=None, help="write the results as JSON here")
    bench.add_argument(
        "--sweep",
        default=None,
        metavar="NAME=V1,V2,...",
        help="score each value of one setting (guidance or steps), e.g. guidance=1.5,2,3,5,7.5; writes --plot",
    )
    bench.add_argument(
        "--plot", default="shapesbench_sweep.png", help="with --sweep: where to save the plot PNG"
    )
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
