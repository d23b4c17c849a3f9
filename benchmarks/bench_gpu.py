"""Stable Diffusion 1.5 at full size on an accelerator: latentdiff against diffusers, bf16.

- train: one optimisation step of the SD-1.5 UNet (forward, MSE loss, backward, AdamW) under bf16 autocast with
  float32 weights (mixed precision, as Stable Diffusion is trained), 64x64 latents (512 px), batch `--batch`, text
  length 77. Reported as images/s and model FLOP utilisation (MFU): the UNet's FLOPs per image, counted from its
  config (`unet_forward_flops`, × 3 for forward and backward), times images/s, over the device's peak bf16 FLOP/s
  (a table of dense bf16 peaks for known GPUs; elsewhere a bf16 GEMM measured here, which is said).
- pipeline: 512x512 images through `LatentPipeline` and diffusers' `StableDiffusionPipeline` in bf16 (25 DDIM steps,
  classifier-free guidance 7.5, batch `--batch`), on an SD-1.5-shaped folder of random weights both load; they
  share the VAE, text encoder and tokenizer (only the UNet and the sampler are each project's own). images/s.

The two UNets of the train step share their weights (diffusers builds the model; ours takes its state dict with
`load_state_dict(assign=True)`), each with its own AdamW; runs alternate (ours, theirs, theirs, ours, ...) after
warm-up calls; medians. Ratio = ours / diffusers in images/s (> 1: latentdiff is faster).

    python -m benchmarks.bench_gpu                           # on a CUDA device: SD-1.5 size, batch 8
    python -m benchmarks.bench_gpu --quick                   # 2 timed repeats, 10 pipeline steps
    python -m benchmarks.bench_gpu --preset tiny --device cpu --quick   # the test's tiny run on a CPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_pipeline import PROMPTS, load_both
from benchmarks.bench_sd_scale import shared_models
from latentdiff.models.unet import UNetConfig
from tests.conftest import build_tiny_clip_tokenizer, build_tiny_sd_folder
from tests.test_unet import SD15_CONFIG

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; SXM parts where there are two).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
TEXT_LEN = 77
GUIDANCE = 7.5

# ------------------------------------------------------------------------------------------------------------
# FLOPs of the UNet, from its config (multiply-adds count 2; norms and pointwise ops are left out, as
# torch.utils.flop_counter leaves them out)


def _resblock_flops(cin: int, cout: int, emb: int, pixels: int) -> int:
    """conv1 3x3, conv2 3x3, the 1x1 shortcut when the width changes, the timestep projection."""
    shortcut = 2 * cin * cout * pixels if cin != cout else 0
    return 2 * 9 * cin * cout * pixels + 2 * 9 * cout * cout * pixels + shortcut + 2 * emb * cout


def _transformer_flops(channels: int, depth: int, tokens: int, text_len: int, text_dim: int) -> int:
    """proj_in and proj_out, then per block: self-attention (Q, K, V, O and the two N×N products),
    cross-attention (Q and O on the image tokens, K and V on the text, the two N×L products), GEGLU (C -> 8C, 4C -> C)."""
    c, n, length = channels, tokens, text_len
    self_attention = 4 * 2 * c * c * n + 2 * 2 * n * n * c
    cross_attention = 2 * 2 * c * c * n + 2 * 2 * text_dim * c * length + 2 * 2 * n * length * c
    feed_forward = 2 * c * 8 * c * n + 2 * 4 * c * c * n
    return 2 * 2 * c * c * n + depth * (self_attention + cross_attention + feed_forward)


def unet_forward_flops(c: UNetConfig, height: int, width: int, text_len: int = TEXT_LEN) -> int:
    """FLOPs of one forward pass of a `ConditionalUNet` of config `c` on one (C_in, height, width) latent with
    `text_len` text tokens, walking the architecture as `ConditionalUNet.__init__` builds it."""
    channels, emb = c.block_out_channels, 4 * c.block_out_channels[0]
    pixels = [(height >> level) * (width >> level) for level in range(c.levels)]
    flops = 2 * 9 * c.in_channels * channels[0] * pixels[0]  # conv_in
    flops += 2 * channels[0] * emb + 2 * emb * emb  # timestep MLP

    def attention(level: int) -> int:
        return _transformer_flops(
            channels[level], c.transformer_layers[level], pixels[level], text_len, c.cross_attention_dim
        )

    for level, cout in enumerate(channels):  # the way down
        cin = channels[max(level - 1, 0)]
        for i in range(c.layers[level]):
            flops += _resblock_flops(cin if i == 0 else cout, cout, emb, pixels[level])
            flops += attention(level) if c.attention_levels[level] else 0
        if level < c.levels - 1:
            flops += 2 * 9 * cout * cout * pixels[level + 1]  # stride-2 conv
    last = c.levels - 1  # the middle
    flops += (1 + c.mid_block_attention) * _resblock_flops(channels[-1], channels[-1], emb, pixels[last])
    flops += attention(last) if c.mid_block_attention else 0
    skips, cin = list(c.skip_channels), channels[-1]
    for level in reversed(range(c.levels)):  # the way up
        cout = channels[level]
        for i in range(c.layers[level] + 1):
            flops += _resblock_flops((cin if i == 0 else cout) + skips.pop(), cout, emb, pixels[level])
            flops += attention(level) if c.attention_levels[level] else 0
        if level > 0:
            flops += 2 * 9 * cout * cout * pixels[level - 1]  # conv after the nearest upsample
        cin = cout
    return flops + 2 * 9 * channels[0] * c.out_channels * pixels[0]  # conv_out


# ------------------------------------------------------------------------------------------------------------
# The device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak bf16 FLOP/s, where the figure comes from) for `device`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name}: {tflops:.0f} TFLOP/s dense bf16 (data sheet)"
    a = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16)
    a @ a  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(3):
        a @ a
    synchronize(device)
    measured = 3 * 2 * 2048**3 / (time.perf_counter() - start)
    return measured, f"{device.type}: {measured / 1e9:.0f} GFLOP/s, a bf16 2048^3 GEMM measured here"


def timed(step: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def alternate(steps: list[Callable[[], Any]], repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each step over `repeats` alternating runs (after one warm-up run each)."""
    for step in steps:
        step()
    times: list[list[float]] = [[] for _ in steps]
    for r in range(repeats):
        for i in range(len(steps)) if r % 2 == 0 else reversed(range(len(steps))):
            times[i].append(timed(steps[i], device))
    return [statistics.median(t) for t in times]


# ------------------------------------------------------------------------------------------------------------
# The model folder, the train step, the pipeline


def write_sd15_folder(path: Path) -> Path:
    """An SD-1.5-shaped pipeline folder of random weights (UNet, f=8 VAE, 12-layer CLIP text model), by diffusers."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_clip_tokenizer(path.parent / "tokenizer-source")
    torch.manual_seed(0)  # a script, not the library: the global RNG is ours to seed
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=TEXT_LEN,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_config(SD15_CONFIG),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)
    return path


def train_steps(
    folder: Path, device: torch.device, batch: int
) -> tuple[list[Callable[[], None]], UNetConfig, int]:
    """The bf16-autocast train steps of (ours, theirs) on shared weights, our config and the latent side."""
    ours, theirs = shared_models(folder / "unet", torch.float32)
    theirs.to(device)  # the same Parameter objects as ours
    config = ours.config
    side = config.sample_size
    generator = torch.Generator().manual_seed(0)
    shape = (batch, config.in_channels, side, side)
    sample, target = (torch.randn(shape, generator=generator).to(device) for _ in range(2))
    context = torch.randn(batch, TEXT_LEN, config.cross_attention_dim, generator=generator).to(device)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)

    def step_of(model: torch.nn.Module, diffusers_api: bool) -> Callable[[], None]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step() -> None:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(sample, timesteps, context)
                out = out.sample if diffusers_api else out
            torch.nn.functional.mse_loss(out.float(), target).backward()
            optimizer.step()

        return step

    return [step_of(ours, False), step_of(theirs, True)], config, side


def pipeline_calls(folder: Path, device: torch.device, batch: int, steps: int) -> tuple[list[Callable], int]:
    """One bf16 text-to-image call of each pipeline (ours, theirs) at the folder's native size, and that size."""
    ours, theirs = load_both(folder)
    ours.to(device=device, dtype=torch.bfloat16)  # also the VAE and text encoder theirs shares
    theirs.unet.to(device=device, dtype=torch.bfloat16)
    size = ours.unet.config.sample_size * 2 ** (len(ours.vae.config.block_out_channels) - 1)

    def call_of(pipe) -> Callable[[], Any]:
        def call() -> Any:
            generator = torch.Generator().manual_seed(0)
            prompts = (PROMPTS * batch)[:batch]
            with torch.inference_mode():
                return pipe(
                    prompts, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generator
                ).images

        return call

    return [call_of(ours), call_of(theirs)], size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=["sd15", "tiny"], default="sd15", help="model size")
    parser.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    parser.add_argument("--batch", type=int, default=8, help="images per train step and per pipeline call")
    parser.add_argument(
        "--steps", type=int, default=None, help="pipeline sampling steps (default 25; --quick 10)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="2 timed repeats and 10 pipeline steps")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    repeats = args.repeats or (2 if args.quick else 5)
    steps = args.steps or (10 if args.quick else 25)

    peak, peak_source = peak_flops(device)
    print(
        f"# torch {torch.__version__}, device {device} ({peak_source}), preset {args.preset}, batch {args.batch}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_tiny_sd_folder(folder) if args.preset == "tiny" else write_sd15_folder(folder)
        train, config, side = train_steps(folder, device, args.batch)
        seconds = alternate(train, repeats, device)
        del train
        flops = 3 * unet_forward_flops(config, side, side)  # forward + backward (2x) per image
        print(f"# train step: {side}x{side} latents, bf16 autocast, AdamW; {flops / 1e9:.1f} GFLOP per image")
        print("| what | latentdiff images/s | diffusers images/s | ratio | latentdiff MFU | diffusers MFU |")
        print("|---|---|---|---|---|---|")
        rate = [args.batch / s for s in seconds]
        mfu = [r * flops / peak for r in rate]
        print(
            f"| train step | {rate[0]:.2f} | {rate[1]:.2f} | {rate[0] / rate[1]:.2f} | "
            f"{100 * mfu[0]:.1f} % | {100 * mfu[1]:.1f} % |"
        )
        calls, size = pipeline_calls(folder, device, args.batch, steps)
        seconds = alternate(calls, repeats, device)
        rate = [args.batch / s for s in seconds]
        print(
            f"| pipeline {size}x{size}, {steps} steps, bf16 | {rate[0]:.3f} | {rate[1]:.3f} | "
            f"{rate[0] / rate[1]:.2f} | – | – |",
            flush=True,
        )


if __name__ == "__main__":
    main()
