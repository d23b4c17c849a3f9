"""The `latentdiff` command line: `latentdiff generate | convert | make-dataset | bench`.

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


def _best_device() -> str:
    """cuda, then mps, then cpu: the fastest device this machine has."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

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
        device=args.device or _best_device(),
        torch_dtype=None if args.dtype is None else getattr(torch, args.dtype),
        control=args.control,
        controlnet=args.controlnet,
        control_scale=args.control_scale,
    )
    for path in paths:
        print(f"saved {path}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from latentdiff.convert import convert_single_file

    out = convert_single_file(args.checkpoint, args.out, args.config, args.original_config, args.offline)
    print(f"saved {out} (load it with LatentPipeline.from_pretrained or latentdiff generate --model)")
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
    from latentdiff.schedulers import DDIMScheduler, DDPMScheduler
    from pipelines.latent_pipeline import LatentPipeline

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
    gen.add_argument(
        "--device",
        choices=["cuda", "mps", "cpu"],
        default=None,
        help="where to run (default: cuda, mps or cpu)",
    )
    gen.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default=None,
        help="weights dtype (default float32)",
    )
    gen.add_argument("--control", default=None, metavar="IMAGE", help="ControlNet condition image")
    gen.add_argument("--controlnet", default=None, metavar="PATH", help="ControlNet folder for --control")
    gen.add_argument("--control-scale", type=float, default=1.0, help="ControlNet weight (0: off)")
    gen.set_defaults(func=_cmd_generate)

    convert = commands.add_parser(
        "convert", help="convert a single-file SD checkpoint into the diffusers layout"
    )
    convert.add_argument("checkpoint", help="the .safetensors file (keys model.diffusion_model.*, ...)")
    convert.add_argument("out", help="the folder to write (must not exist)")
    convert.add_argument(
        "--config",
        default=None,
        help="diffusers folder or hub id of the same architecture (configs, tokenizer)",
    )
    convert.add_argument("--original-config", default=None, help="the checkpoint's original LDM YAML config")
    convert.add_argument(
        "--offline", action="store_true", help="never reach the hub (--config must be a folder)"
    )
    convert.set_defaults(func=_cmd_convert)

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
