"""`latentdiff convert`: a single-file SD checkpoint (original LDM key layout) into the diffusers folder layout,
through diffusers' own converter. The checkpoint is made here from the tiny SD folder by writing every tensor under
its original Stable Diffusion name (the inverse of diffusers' `convert_ldm_*_checkpoint` maps), so the test checks a
real round trip: converted folder == the folder the checkpoint was made from, weight for weight and image for image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from latentdiff import cli
from latentdiff.convert import convert_single_file
from pipelines.latent_pipeline import LatentPipeline

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    layer, _, param = rest.partition(".")
    return f"{RESNET[layer]}.{param}"


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel names -> `model.diffusion_model.*` (SD's original names)."""
    per_level = config["layers_per_block"] + 1  # input_blocks per level: L resnets + a downsampler
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "time_embedding":
            name = f"time_embed.{0 if parts[1] == 'linear_1' else 2}.{parts[2]}"
        elif parts[0] in ("conv_in", "conv_norm_out", "conv_out"):
            name = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}[parts[0]]
            name += "." + parts[1]
        elif parts[0] == "down_blocks":
            level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "downsamplers":
                name = f"input_blocks.{(level + 1) * per_level}.0.op.{parts[-1]}"
            else:
                block = 1 + level * per_level + j
                name = (
                    f"input_blocks.{block}.0.{_resnet(rest)}"
                    if kind == "resnets"
                    else f"input_blocks.{block}.1.{rest}"
                )
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            name = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        else:  # up_blocks
            level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            block = level * per_level + (per_level - 1 if kind == "upsamplers" else j)
            if kind == "upsamplers":
                name = f"output_blocks.{block}.{2 if up_attention[level] else 1}.{rest}"
            elif kind == "resnets":
                name = f"output_blocks.{block}.0.{_resnet(rest)}"
            else:
                name = f"output_blocks.{block}.1.{rest}"
        out["model.diffusion_model." + name] = tensor
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> `first_stage_model.*`; the mid attention's Linears become 1×1 convs."""
    levels = len(config["block_out_channels"])
    out = {}
    for key, tensor in state.items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        parts = name.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if parts[1] == "down_blocks" else levels - 1 - int(parts[2])
            where = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] == "resnets":
                name = f"{parts[0]}.{where}.{level}.block.{'.'.join(parts[4:])}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                name = f"{parts[0]}.{where}.{level}.{where}sample.{'.'.join(parts[5:])}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            name = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif parts[1] == "mid_block":  # attentions.0.<layer>.<param>
            layer, param = ".".join(parts[4:-1]), parts[-1]
            name = f"{parts[0]}.mid.attn_1.{VAE_ATTENTION[layer]}.{param}"
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        out["first_stage_model." + name] = tensor
    return out


@pytest.fixture(scope="module")
def single_file(tiny_sd_dir, tmp_path_factory) -> Path:
    """The tiny SD folder as one original-layout .safetensors file (float32)."""
    read = lambda part: json.loads((tiny_sd_dir / part / "config.json").read_text())  # noqa: E731
    unet = load_file(str(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(tiny_sd_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    text = load_file(str(tiny_sd_dir / "text_encoder" / "model.safetensors"))
    state = {
        **unet_to_ldm(unet, read("unet")),
        **vae_to_ldm(vae, read("vae")),
        # SD's names keep CLIP's `text_model.` level, which transformers 5 no longer writes
        **{
            "cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
            for k, v in text.items()
        },
    }
    path = tmp_path_factory.mktemp("single-file") / "tiny-sd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.slow
def test_convert_round_trips_a_single_file_checkpoint(tiny_sd_dir, single_file, tmp_path):
    out = tmp_path / "converted"
    assert cli.main(["convert", str(single_file), str(out), "--config", str(tiny_sd_dir), "--offline"]) == 0
    for part, name in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        original = load_file(str(tiny_sd_dir / part / f"{name}.safetensors"))
        converted = load_file(str(out / part / f"{name}.safetensors"))
        assert sorted(converted) == sorted(original), part
        assert all(torch.equal(converted[k], original[k]) for k in original), part
    assert (out / "README.md").read_text().startswith("---\nlibrary_name:")
    images = []
    for folder in (tiny_sd_dir, out):
        pipe = LatentPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                           output_type="np").images)  # fmt: skip
    np.testing.assert_array_equal(images[0], images[1])


def test_convert_refuses_pickles_missing_files_and_an_existing_folder(tmp_path, tiny_sd_dir):
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"not a .safetensors file; pickled checkpoints"):
        convert_single_file(pickle, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert_single_file(tmp_path / "nothing.safetensors", tmp_path / "out")
    existing = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(existing))
    with pytest.raises(FileExistsError, match="already exists"):
        convert_single_file(existing, tiny_sd_dir)
    assert cli.main(["convert", str(pickle), str(tmp_path / "out")]) == 2
