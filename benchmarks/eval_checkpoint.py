"""The strict ShapesBench of a text-to-image training checkpoint's EMA weights, or of a model folder as it is.

    python -m benchmarks.eval_checkpoint --checkpoint outputs/default/pipeline/checkpoint-3000 \
        --vae outputs/default/vae-refine/vae --prompt-seeds 7 2026
    python -m benchmarks.eval_checkpoint --guidance 2 --guidance-rescale 0.7      # the embedded default as it is

A checkpoint of `train_t2i.py` (`checkpoint-N/ema.safetensors`, written with --use_ema) holds the averaged UNet and,
when the text tower trains, its averaged weights: they are loaded into the model folder's architecture (`--model`,
default the embedded default), with its VAE or `--vae`. Each prompt seed is one fixed prompt set
(`bench_prompts(seed=S)`, 48 prompts per group); full match and fidelity are printed per group and written to
`--json`. The README's training-length table and guidance-rescale figures (issue 18) come from this script.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def load_ema(pipe, checkpoint: Path) -> None:
    """Writes the checkpoint's EMA weights (keys `unet.…`, `text_encoder.…`) into the pipeline's modules."""
    from safetensors.torch import load_file

    path = checkpoint / "ema.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no EMA weights; pass a checkpoint of a run with --use_ema")
    averaged = load_file(str(path))
    for prefix, module in (("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder)):
        state = {name[len(prefix) :]: t for name, t in averaged.items() if name.startswith(prefix)}
        if not state:
            continue  # a frozen text tower has no averaged weights
        expected = set(module.state_dict())
        if not set(state) <= expected:
            raise ValueError(
                f"{path}: weights for another architecture, e.g. {sorted(set(state) - expected)[:3]}"
            )
        module.load_state_dict(state, strict=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the embedded default)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint-N folder whose EMA weights to score")
    parser.add_argument("--vae", help="an AutoencoderKL folder to decode with instead of the model's")
    parser.add_argument(
        "--prompt-seeds", type=int, nargs="+", default=[7], help="fixed prompt sets (7: the bench's)"
    )
    parser.add_argument("--per-group", type=int, default=48)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--guidance-rescale", type=float, default=0.0)
    parser.add_argument("--json", type=Path, help="write the scores here")
    args = parser.parse_args(argv)

    from latentdiff.eval.shapesbench import bench_prompts, score
    from pipelines.latent_pipeline import LatentPipeline

    pipe = LatentPipeline() if args.model is None else LatentPipeline.from_pretrained(args.model)
    if args.vae:
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(args.vae).eval()
    if args.checkpoint is not None:
        load_ema(pipe, args.checkpoint)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for seed in args.prompt_seeds:
        prompts = bench_prompts(per_group=args.per_group, seed=seed)
        images = []
        for start in range(0, len(prompts), 16):
            batch = prompts[start : start + 16]
            images += pipe(
                [p.text for p in batch],
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                guidance_rescale=args.guidance_rescale,
                generator=[torch.Generator().manual_seed(p.seed) for p in batch],
            ).images
        results[str(seed)] = score(images, prompts)
        row = results[str(seed)]
        print(
            f"prompt seed {seed}: "
            + "  ".join(
                f"{g} {row[g]['full_match']:.3f} / {row[g]['fidelity']:.3f}"
                for g in ("single", "two", "held_out")
            )
        )
    if args.json:
        args.json.write_text(
            json.dumps({"settings": vars(args) | {"json": str(args.json)}, "results": results}, default=str)
        )
    return results


if __name__ == "__main__":
    main()
