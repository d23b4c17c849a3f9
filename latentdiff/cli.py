"""The `latentdiff` command line: `latentdiff generate | edit | inpaint | convert | make-dataset | bench | serve`.

Each sub-command parses its flags here and calls one library function; heavy imports (torch, diffusers) happen only
inside the command that needs them, so `latentdiff --help` is instant. A user error (a bad value, a missing or
existing file) prints one line, `latentdiff COMMAND: error: ...`, and exits with code 2, as argparse does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from latentdiff import __version__, validation

# latentdiff.schedulers.registry.SAMPLERS's names, listed here so that `--help` imports no torch (a test keeps the two
# equal)
SAMPLER_NAMES = ("ddim", "ddpm", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde")
KARRAS_HELP = "Karras et al. 2022 noise levels (euler, heun, dpmpp_2m, dpmpp_2m_sde)"

# the default of --steps, --guidance and --sampler, said in their help
_CARRIED = " (default: the model's sampling_settings.json, else diffusers' 50 steps, guidance 7.5)"


def _best_device() -> str:
    """cuda, then mps, then cpu: the fastest device this machine has."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _sampling_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments `generate`, `edit_image` and `inpaint_image` share, from their shared flags; the seed
    is drawn here when random, so that it can be printed."""
    import torch

    seed = validation.check_seed(args.seed, args.num_images)
    return dict(
        output=args.output,
        model=args.model,
        negative=args.negative,
        steps=args.steps,
        guidance=args.guidance,
        seed=validation.random_seed() if seed is None else seed,
        num_images=args.num_images,
        sampler=args.sampler,
        karras=args.karras,
        eta=args.eta,
        loras=[validation.parse_lora_spec(spec) for spec in args.lora],
        overwrite=args.overwrite,
        device=args.device or _best_device(),
        torch_dtype=None if args.dtype is None else getattr(torch, args.dtype),
    )


@contextlib.contextmanager
def _no_garbage_collection() -> Iterator[None]:
    """No garbage collection during a one-shot command (generate, edit, inpaint): importing torch, diffusers and
    transformers and loading a model make millions of objects and no garbage, and Python's collector would walk them
    again and again (0.5 s of CPU, BENCHMARKS.md section 5); the collector's state is restored after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _cmd_generate(args: argparse.Namespace) -> int:
    with _no_garbage_collection():
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    from latentdiff.generate import generate

    settings = _sampling_settings(args)
    guides = dict(  # generate's own flags: classifier guidance and ControlNet
        classifier=args.classifier,
        class_labels=args.class_labels,
        classifier_scale=args.classifier_scale,
        control=args.control,
        controlnet=args.controlnet,
        control_scale=args.control_scale,
    )
    for path in generate(
        args.prompt, height=args.height, width=args.width, compile=args.compile, **guides, **settings
    ):
        print(f"saved {path} (seed {settings['seed']})")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from latentdiff.convert import convert_single_file

    out = convert_single_file(args.checkpoint, args.out, args.config, args.original_config, args.offline)
    print(f"saved {out} (load it with LatentPipeline.from_pretrained or latentdiff generate --model)")
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    with _no_garbage_collection():
        return _edit(args)


def _edit(args: argparse.Namespace) -> int:
    from latentdiff.edit import edit_image, inpaint_image

    settings = _sampling_settings(args)
    if args.command == "inpaint":
        paths = inpaint_image(args.image, args.mask, args.prompt, strength=args.strength, **settings)
    else:
        paths = edit_image(args.image, args.prompt, strength=args.strength, **settings)
    for path in paths:
        print(f"saved {path} (seed {settings['seed']})")
    return 0


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The flags `generate`, `edit` and `inpaint` share."""
    parser.add_argument(
        "-o",
        "--output",
        default="out.png",
        help="PNG path (several images: a grid); an existing file is refused unless --overwrite",
    )
    parser.add_argument(
        "--model", default=None, help="SD-layout folder or hub id (default: the embedded model)"
    )
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--steps", type=int, default=None, help=f"number of sampling steps{_CARRIED}")
    parser.add_argument(
        "--guidance",
        type=validation.finite_float,
        default=None,
        help=f"classifier-free guidance scale (<= 1: off){_CARRIED}",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the first image (default or -1: random; the seed is printed)",
    )
    parser.add_argument("--num-images", type=int, default=1, help="images to generate for the prompt")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, help=f"sampler{_CARRIED}")
    parser.add_argument("--karras", action="store_true", help=KARRAS_HELP)
    parser.add_argument(
        "--eta", type=validation.finite_float, default=0.0, help="DDIM eta (0: deterministic)"
    )
    parser.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA adapter (repeatable)"
    )
    parser.add_argument(
        "--device",
        choices=["cuda", "mps", "cpu"],
        default=None,
        help="where to run (default: cuda, mps or cpu)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default=None,
        help="weights dtype (default float32)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output file (without it, an existing file is never replaced: the run is refused)",
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
    from latentdiff.eval.sweep import format_sweep_table, parse_sweep, plot_sweep, run_sweep
    from latentdiff.lora import find_lora_file
    from latentdiff.schedulers.registry import check_sampler, choose_sampler
    from pipelines.latent_pipeline import LatentPipeline

    if args.edits:
        from latentdiff.bench_edits import bench_edits

        return bench_edits(args)
    if args.sampler is not None:
        check_sampler(args.sampler, args.karras)
    loras = [validation.parse_lora_spec(spec) for spec in args.lora]
    for path, _ in loras:
        find_lora_file(path)
    words = _parse_words(args.word)
    for name in ("grid", "json"):  # check where the results go before the bench runs
        if getattr(args, name):
            validation.check_output_file(Path(getattr(args, name)), overwrite=True, name=f"--{name}")
    sweep = parse_sweep(args.sweep) if args.sweep else None  # checked before loading any model
    if args.prompts:  # read (and check) the prompt file before loading any model
        prompts = shapesbench.read_prompt_file(args.prompts)
    else:
        groups = (*shapesbench.GROUPS, shapesbench.STAR_GROUP) if args.star else shapesbench.GROUPS
        prompts = shapesbench.bench_prompts(groups)
    pipe = LatentPipeline() if args.model is None else LatentPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = choose_sampler(pipe.scheduler, args.sampler, args.karras)
    steps, guidance = pipe.resolve_sampling(args.steps, args.guidance)
    for path, scale in loras:
        pipe.load_lora_weights(path, scale=scale)
    for path in args.textual_inversion:
        pipe.load_textual_inversion(path)

    def make_generate_fn(steps: int, guidance: float):
        def generate_fn(texts: list[str], seeds: list[int]) -> list:
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            return pipe(
                [_replace_words(text, words) for text in texts],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
            ).images

        return generate_fn

    settings = {
        "model": args.model or "embedded default",
        "sampler": args.sampler or type(pipe.scheduler).__name__,
        "karras": args.karras,
        "steps": steps,
        "guidance_scale": guidance,
        "lora": args.lora,
        "textual_inversion": args.textual_inversion,
        "words": words,
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


def _parse_words(specs: list[str]) -> dict[str, str]:
    """{WORD: TOKEN} of `--word WORD=TOKEN` flags; SystemExit naming a malformed one."""
    words = {}
    for spec in specs:
        word, sep, token = spec.partition("=")
        if not sep or not word.strip() or not token.strip():
            raise SystemExit(f"latentdiff bench: --word {spec!r}: expected WORD=TOKEN, e.g. star='<star>'.")
        words[word.strip()] = token.strip()
    return words


def _replace_words(text: str, words: dict[str, str]) -> str:
    """`text` with each whole WORD written as its TOKEN."""
    for word, token in words.items():
        text = re.sub(rf"\b{re.escape(word)}\b", token, text)
    return text


def _write_json(result: dict, path: str | None) -> int:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from latentdiff.webui import serve

    serve(model=args.model, host=args.host, port=args.port, lora_dir=args.lora_dir, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description="Latent text-to-image diffusion.")
    parser.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate images from a prompt")
    gen.add_argument("prompt", help="the text prompt")
    _add_sampling_flags(gen)
    gen.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    gen.add_argument(
        "--classifier",
        default=None,
        help="classifier guidance: a train_classifier.py folder (default: the embedded model's own)",
    )
    gen.add_argument(
        "--class-labels",
        default=None,
        help="its target: a layout ('a red circle in the top left') or name=index pairs ('color=2 shape=0')",
    )
    gen.add_argument(
        "--classifier-scale", type=validation.finite_float, default=5.0, help="classifier guidance scale s"
    )
    gen.add_argument("--control", default=None, metavar="IMAGE", help="ControlNet condition image")
    gen.add_argument("--controlnet", default=None, metavar="PATH", help="ControlNet folder for --control")
    gen.add_argument("--control-scale", type=float, default=1.0, help="ControlNet weight (0: off)")
    gen.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (one graph) first: faster steps after a first one that compiles",
    )
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
    data.add_argument("--num-images", type=int, default=10_000, help="number of images (>= 1)")
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
    data.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset this command wrote there (images/ and metadata.jsonl; other files are left alone)",
    )
    data.set_defaults(func=_cmd_make_dataset)

    bench = commands.add_parser("bench", help="score a model on ShapesBench")
    bench.add_argument("--model", default=None, help="SD-layout folder (default: the embedded model)")
    bench.add_argument("--steps", type=int, default=None, help=f"sampling steps{_CARRIED}")
    bench.add_argument(
        "--guidance", type=validation.finite_float, default=None, help=f"guidance scale{_CARRIED}"
    )
    bench.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, help=f"sampler{_CARRIED}")
    bench.add_argument("--karras", action="store_true", help=KARRAS_HELP)
    bench.add_argument(
        "--prompts", default=None, help="a prompt file (one per line) instead of the fixed set"
    )
    bench.add_argument(
        "--star", action="store_true", help="also score the star prompts (the LoRA demonstration)"
    )
    bench.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA adapter (repeatable)"
    )
    bench.add_argument(
        "--textual-inversion",
        action="append",
        default=[],
        metavar="PATH",
        help="a learned embedding (learned_embeds.safetensors or its folder) whose word the prompts may use "
        "(repeatable; see --word)",
    )
    bench.add_argument(
        "--word",
        action="append",
        default=[],
        metavar="WORD=TOKEN",
        help="generate with TOKEN where a prompt says WORD, score against the prompt as written (e.g. "
        "star='<star>' for a textual inversion of the star; repeatable)",
    )
    bench.add_argument("--grid", default="shapesbench_grid.png", help="where to save a sample grid PNG")
    bench.add_argument(
        "--edits",
        action="store_true",
        help="score edits instead (recolour, add, remove, invert; see latentdiff/eval/edits.py)",
    )
    bench.add_argument("--edit-cases", type=int, default=24, help="with --edits: cases per edit kind")
    bench.add_argument(
        "--edit-kinds",
        default=None,
        metavar="KIND,KIND,...",
        help="with --edits: only these kinds (recolour, add, remove, invert); default: all, or add,remove for "
        "an inpainting UNet (2C+1 input channels)",
    )
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

    serve = commands.add_parser(
        "serve", help="a local web page: text to image with a progress bar and a gallery"
    )
    serve.add_argument(
        "--model", default=None, help="SD-layout folder or hub id (default: the embedded model)"
    )
    serve.add_argument("--port", type=int, default=7860, help="TCP port (0: any free port)")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: this machine only; 0.0.0.0: everyone)",
    )
    serve.add_argument("--lora-dir", default=None, help="a folder of LoRA adapters the page may apply")
    serve.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best there is)")
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, OSError) as error:  # user errors: one line, no traceback
        print(f"latentdiff {args.command}: error: {error}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The `latentdiff` console script: `main`, then an exit whose last garbage collections skip every object the
    command made (`gc.freeze`): the process ends and the system takes its memory back at once, where Python's
    collections at exit would walk the objects of torch, diffusers and transformers first (1.6 to 1.9 s of CPU after
    `latentdiff generate` on a loaded 2-core machine; BENCHMARKS.md section 5)."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console_main()
