"""ControlNet: residual parity with diffusers' ControlNetModel (SD-1 and SD-2 style), the UNet's residual inputs,
ControlNetPipeline against diffusers' StableDiffusionControlNetPipeline, each side's models in the other's pipelines,
and the behaviour the paper promises (a zero-initialised ControlNet changes nothing).

Every ControlNet here has random weights everywhere, zero convolutions included (`randomised`): with the zero
convolutions at zero, any two implementations would agree on residuals of 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as DiffusersControlNet
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from latentdiff.lora import LoraSpec, add_lora, set_active_adapters
from latentdiff.models import ConditionalUNet, ControlNetModel, UNetConfig
from pipelines import ControlNetPipeline, LatentPipeline

TINY_CONDITION_CHANNELS = (8, 16, 16)  # two stride-2 convs: the tiny VAE's factor 4
STEPS = 3
PROMPTS = ["a red circle in the top left", "a small blue square"]


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter ~ N(0, 0.05²), zero convolutions included, drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def condition_image(side: int = 32, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ------------------------------------------------------------------------------------------ the models alone

TINY_CONFIGS = {
    # SD 1.x: conv projections in the transformers, one head count for all levels
    "sd1": dict(attention_head_dim=4, use_linear_projection=False, upcast_attention=False),
    # SD 2.x: linear projections, heads per level, upcast attention
    "sd2": dict(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True),
}


def diffusers_controlnet(style: str, seed: int = 0) -> DiffusersControlNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DiffusersControlNet(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=8,
            conditioning_embedding_out_channels=TINY_CONDITION_CHANNELS,
            **TINY_CONFIGS[style],
        )
    return randomised(net, seed)


@pytest.mark.parametrize("style", TINY_CONFIGS)
def test_controlnet_folder_gives_diffusers_residuals_and_saves_what_diffusers_reads(style, tmp_path):
    reference = diffusers_controlnet(style)
    reference.save_pretrained(tmp_path / "theirs")
    ours = ControlNetModel.from_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    reread = DiffusersControlNet.from_pretrained(tmp_path / "ours")
    sample, context = torch.randn(2, 4, 8, 8, generator=seeded(1)), torch.randn(2, 7, 32, generator=seeded(2))
    condition = torch.rand(2, 3, 32, 32, generator=seeded(3))
    for guess_mode in (False, True):
        arguments = dict(controlnet_cond=condition, conditioning_scale=0.7, guess_mode=guess_mode)
        with torch.no_grad():
            theirs = reference(sample, 10, encoder_hidden_states=context, **arguments, return_dict=False)
            mine = ours(sample, 10, encoder_hidden_states=context, **arguments)
            again = reread(sample, 10, encoder_hidden_states=context, **arguments, return_dict=False)
        assert len(mine.down_block_res_samples) == len(theirs[0]) == 4  # conv_in + 1 + downsample + 1
        for a, b, c in zip(
            [*theirs[0], theirs[1]],
            [*mine.down_block_res_samples, mine.mid_block_res_sample],
            [*again[0], again[1]],
        ):
            assert a.abs().max() > 0.01  # real residuals
            # same weights, same operations in the same order: equal up to float32 rounding of reordered sums
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def unets(tiny_sd_dir):
    """(diffusers' UNet, this project's UNet) with the tiny folder's weights."""
    return (
        UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet"),
        ConditionalUNet.from_pretrained(tiny_sd_dir, subfolder="unet"),
    )


def test_unet_adds_residuals_as_diffusers_does_and_answers_its_call(unets):
    theirs, ours = unets
    controlnet = randomised(
        ControlNetModel.from_unet(ours, conditioning_embedding_out_channels=TINY_CONDITION_CHANNELS)
    )
    sample, context = torch.randn(2, 4, 8, 8, generator=seeded(1)), torch.randn(2, 7, 32, generator=seeded(2))
    with torch.no_grad():
        down, mid = controlnet(
            sample, 5, context, torch.rand(2, 3, 32, 32, generator=seeded(3)), return_dict=False
        )
        residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        reference = theirs(sample, 5, encoder_hidden_states=context, **residuals, return_dict=False)[0]
        mine = ours(sample, 5, encoder_hidden_states=context, **residuals, return_dict=False)
        plain = ours(sample, 5, context, return_dict=True).sample
    assert isinstance(mine, tuple) and len(mine) == 1
    torch.testing.assert_close(mine[0], reference, rtol=1e-5, atol=1e-6)
    assert (mine[0] - plain).abs().max() > 0.01  # the residuals matter
    torch.testing.assert_close(plain, theirs(sample, 5, context).sample, rtol=1e-5, atol=1e-6)


def test_zero_initialised_controlnet_changes_nothing_and_copies_the_encoder(unets):
    _, unet = unets
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_CONDITION_CHANNELS)
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        mine, theirs = getattr(controlnet, name).state_dict(), getattr(unet, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    sample, context = torch.randn(1, 4, 8, 8, generator=seeded(1)), torch.randn(1, 7, 32, generator=seeded(2))
    with torch.no_grad():
        down, mid = controlnet(
            sample, 500, context, torch.rand(1, 3, 32, 32, generator=seeded(3)), return_dict=False
        )
        with_controlnet = unet(
            sample, 500, context, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )
        without = unet(sample, 500, context)
    assert all(not r.any() for r in [*down, mid])
    assert torch.equal(with_controlnet, without)


def test_lora_scale_in_cross_attention_kwargs_weights_the_adapter_for_one_call(tiny_sd_dir):
    unet = ConditionalUNet.from_pretrained(tiny_sd_dir, subfolder="unet")
    add_lora(unet, LoraSpec(rank=2, target_modules=("to_q", "to_v")), generator=seeded(0))
    for layer in unet.modules():  # B = 0 at initialisation: make the adapter do something
        if hasattr(layer, "lora_B"):
            randomised(layer.lora_B, 1)
    sample, context = torch.randn(1, 4, 8, 8, generator=seeded(1)), torch.randn(1, 7, 32, generator=seeded(2))
    with torch.no_grad():
        full = unet(sample, 10, context)
        half = unet(sample, 10, context, cross_attention_kwargs={"scale": 0.5})
        set_active_adapters(unet, ["default"], [0.5])
        weighted = unet(sample, 10, context)
        set_active_adapters(unet, ["default"], [1.0])
        again = unet(sample, 10, context)
    torch.testing.assert_close(half, weighted, rtol=0, atol=1e-6)
    assert (half - full).abs().max() > 1e-3
    assert torch.equal(again, full)  # the scale lasted one call
    with pytest.raises(ValueError, match="only 'scale'"):
        unet(sample, 10, context, cross_attention_kwargs={"ip_adapter_masks": None})
    with pytest.raises(ValueError, match="timestep_cond"):
        unet(sample, 10, context, timestep_cond=torch.zeros(1, 4))


# ------------------------------------------------------------------------------------------ refusals


def test_a_controlnet_for_another_unet_shape_is_refused_by_name(tiny_sd_dir, unets):
    _, unet = unets
    other = UNetConfig(**{**unet.config.__dict__, "block_out_channels": (32, 32)})
    controlnet = ControlNetModel.from_unet(
        ConditionalUNet(other), conditioning_embedding_out_channels=TINY_CONDITION_CHANNELS
    )
    with pytest.raises(ValueError, match="another UNet shape.*skip_channels"):
        ControlNetPipeline.from_pretrained(tiny_sd_dir, controlnet=controlnet)
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    down, mid = controlnet(sample, 1, context, torch.rand(1, 3, 32, 32), return_dict=False)
    with pytest.raises(ValueError, match=r"down_block_additional_residuals\[3\].*another UNet shape"):
        unet(sample, 1, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    with pytest.raises(ValueError, match="3 tensors but this UNet keeps 4"):
        unet(sample, 1, context, down_block_additional_residuals=down[:3])
    eight_times = ControlNetModel.from_unet(unet)  # SD's condition embedding: 8x, the tiny VAE is 4x
    with pytest.raises(ValueError, match="shrinks images 8x.*VAE's factor is 4"):
        ControlNetPipeline.from_pretrained(tiny_sd_dir, controlnet=eight_times)


def test_condition_of_the_wrong_size_is_refused_by_the_model_and_resized_by_the_pipeline(tiny_sd_dir, unets):
    _, unet = unets
    controlnet = randomised(
        ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=TINY_CONDITION_CHANNELS)
    )
    with pytest.raises(ValueError, match=r"controlnet_cond has shape \(1, 3, 16, 16\).*\(1, 3, 32, 32\)"):
        controlnet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 7, 32), torch.rand(1, 3, 16, 16))
    pipe = ControlNetPipeline.from_pretrained(tiny_sd_dir, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    small = condition_image(16)
    arguments = dict(prompt=PROMPTS[0], num_inference_steps=STEPS, output_type="np")
    resized = pipe(**arguments, image=small, height=32, width=32, generator=seeded()).images
    by_hand = pipe(**arguments, image=small.resize((32, 32), Image.LANCZOS), generator=seeded()).images
    assert np.array_equal(resized, by_hand)
    assert pipe(**arguments, image=small, generator=seeded()).images.shape == (1, 16, 16, 3)  # its own size
    with pytest.raises(ValueError, match="image has a batch of 3 conditions for 2 prompts"):
        pipe(**{**arguments, "prompt": PROMPTS}, image=[small] * 3, height=32, width=32)


# ------------------------------------------------------------------------------------------ pipelines


@pytest.fixture(scope="module")
def controlnet_dirs(tiny_sd_dir, tmp_path_factory):
    """Two diffusers ControlNet folders for the tiny SD folder's UNet, random weights."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    folders = []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp("controlnet") / f"net{seed}"
        net = DiffusersControlNet.from_unet(unet, conditioning_embedding_out_channels=TINY_CONDITION_CHANNELS)
        randomised(net, seed).save_pretrained(folder)
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def diffusers_ddim(tiny_sd_dir) -> DiffusersDDIM:
    return DiffusersDDIM.from_pretrained(tiny_sd_dir, subfolder="scheduler", clip_sample=False)


PIPELINE_CASES = {
    "cfg": dict(controlnet_conditioning_scale=0.8),
    "guess mode": dict(guess_mode=True, guidance_scale=5.0),
    "window, 2 images each, no guidance": dict(
        control_guidance_start=0.3, control_guidance_end=0.7, num_images_per_prompt=2, guidance_scale=1.0
    ),
    "two controlnets": dict(controlnet_conditioning_scale=[0.6, 1.2], control_guidance_end=[1.0, 0.5]),
}


@pytest.mark.parametrize("case", PIPELINE_CASES, ids=list(PIPELINE_CASES))
def test_images_match_stable_diffusion_controlnet_pipeline(
    case, tiny_sd_dir, controlnet_dirs, diffusers_ddim
):
    arguments = dict(PIPELINE_CASES[case], prompt=PROMPTS, num_inference_steps=STEPS, output_type="np")
    folders = controlnet_dirs if case == "two controlnets" else controlnet_dirs[0]
    arguments["image"] = (
        [condition_image(seed=1), condition_image(seed=2)] if case == "two controlnets" else condition_image()
    )
    pipe = ControlNetPipeline.from_pretrained(tiny_sd_dir, controlnet=folders)
    pipe.set_progress_bar_config(disable=True)
    nets = (
        [DiffusersControlNet.from_pretrained(f) for f in folders]
        if case == "two controlnets"
        else DiffusersControlNet.from_pretrained(folders)
    )
    reference = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd_dir, controlnet=nets, scheduler=diffusers_ddim, safety_checker=None
    )
    reference.set_progress_bar_config(disable=True)
    ours = pipe(**arguments, generator=seeded()).images
    theirs = reference(**arguments, generator=seeded()).images
    switched_off = pipe(**{**arguments, "controlnet_conditioning_scale": 0.0}, generator=seeded()).images
    assert ours.shape == theirs.shape and ours.std() > 0.01
    assert np.abs(ours - theirs).max() <= 2e-3
    assert np.abs(ours - switched_off).max() > 2e-3  # the ControlNet did something


def test_switched_off_controlnet_gives_the_base_pipelines_images_bit_for_bit(tiny_sd_dir, controlnet_dirs):
    pipe = ControlNetPipeline.from_pretrained(tiny_sd_dir, controlnet=controlnet_dirs[0])
    base = LatentPipeline(pipe.unet, pipe.scheduler, pipe.vae, pipe.text_encoder, pipe.tokenizer)
    for p in (pipe, base):
        p.set_progress_bar_config(disable=True)
    arguments = dict(prompt=PROMPTS, num_inference_steps=STEPS, output_type="np")
    off = pipe(
        **arguments, image=condition_image(), controlnet_conditioning_scale=0.0, generator=seeded()
    ).images
    assert np.array_equal(off, base(**arguments, generator=seeded()).images)


def test_save_pretrained_writes_a_controlnet_pipeline_folder_both_sides_read(
    tiny_sd_dir, controlnet_dirs, tmp_path
):
    pipe = ControlNetPipeline.from_pretrained(tiny_sd_dir, controlnet=controlnet_dirs)
    pipe.save_pretrained(tmp_path / "saved")
    again = ControlNetPipeline.from_pretrained(tmp_path / "saved")  # its controlnet/ and controlnet_1/
    theirs = StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    assert len(again.controlnets) == 2 and len(theirs.controlnet.nets) == 2
    for mine, saved in zip(pipe.controlnets, again.controlnets):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), saved.state_dict().values()))


def test_diffusers_pipelines_run_this_projects_unet_and_controlnet(
    tiny_sd_dir, controlnet_dirs, diffusers_ddim
):
    """diffusers checks `isinstance(controlnet, its ControlNetModel)` for a single net: ours goes in a list."""
    unet = ConditionalUNet.from_pretrained(tiny_sd_dir, subfolder="unet")
    controlnet = ControlNetModel.from_pretrained(controlnet_dirs[0])
    theirs = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_sd_dir,
        controlnet=DiffusersControlNet.from_pretrained(controlnet_dirs[0]),
        scheduler=diffusers_ddim,
        safety_checker=None,
    )
    mixed = StableDiffusionControlNetPipeline(
        **{**theirs.components, "unet": unet, "controlnet": [controlnet]}
    )
    parts = {name: part for name, part in theirs.components.items() if name != "controlnet"}
    text_only = StableDiffusionPipeline(**{**parts, "unet": unet})
    text_reference = StableDiffusionPipeline(**parts)
    for p in (theirs, mixed, text_only, text_reference):
        p.set_progress_bar_config(disable=True)
    arguments = dict(
        prompt=PROMPTS[0], num_inference_steps=STEPS, output_type="np", cross_attention_kwargs={"scale": 0.5}
    )
    image = condition_image()
    reference = theirs(**arguments, image=image, generator=seeded()).images
    assert np.abs(mixed(**arguments, image=[image], generator=seeded()).images - reference).max() <= 2e-3
    reference = text_reference(**arguments, generator=seeded()).images
    assert np.abs(text_only(**arguments, generator=seeded()).images - reference).max() <= 2e-3


def test_generate_cli_with_a_control_image_writes_the_pipelines_image(
    tiny_sd_dir, controlnet_dirs, tmp_path, capsys
):
    from latentdiff.cli import main

    condition_image().save(tmp_path / "layout.png")
    out = tmp_path / "out.png"
    flags = ["--model", str(tiny_sd_dir), "--steps", "2", "--seed", "7", "--guidance", "5"]
    control = ["--control", str(tmp_path / "layout.png"), "--controlnet", str(controlnet_dirs[0])]
    assert main(["generate", PROMPTS[0], "-o", str(out), *flags, *control, "--device", "cpu"]) == 0
    pipe = ControlNetPipeline.from_pretrained(tiny_sd_dir, controlnet=controlnet_dirs[0])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPTS[0], image=condition_image(), num_inference_steps=2, guidance_scale=5.0, generator=[seeded(7)]
    ).images[0]
    with Image.open(out) as written:
        assert written.text["controlnet"] == str(controlnet_dirs[0])
        np.testing.assert_array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))
    assert (
        main(
            [
                "generate",
                PROMPTS[0],
                "-o",
                str(tmp_path / "other.png"),
                *flags,
                "--control",
                str(tmp_path / "layout.png"),
            ]
        )
        == 2
    )
    assert "go together" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ training


def make_conditioned_imagefolder(folder, n: int = 6, size: int = 32):
    """An imagefolder of n images with captions and condition images (`conditioning_image_file_name`, which
    `datasets` reads as the image column `conditioning_image`); row 3's condition is a corrupt file."""
    import json

    (folder / "conditions").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        condition = folder / "conditions" / f"{i}.png"
        if i == 3:
            condition.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
        else:
            Image.fromarray(rng.integers(0, 2, (size, size, 3), dtype=np.uint8) * 255).save(condition)
        rows.append(
            {
                "file_name": f"{i}.png",
                "conditioning_image_file_name": f"conditions/{i}.png",
                "text": PROMPTS[i % 2],
            }
        )
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def controlnet_args(model, data, out, **flags) -> list[str]:
    values = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
        "output_dir": out,
        "resolution": 32,
        "train_batch_size": 2,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "seed": 0,
        "report_to": "none",
        **flags,
    }
    return [
        part
        for name, value in values.items()
        for part in (f"--{name}", *map(str, value if isinstance(value, list) else [value]))
    ]


@pytest.mark.slow
def test_controlnet_training_trains_only_the_controlnet_and_resume_equals_the_uninterrupted_run(
    tmp_path, tiny_sd_dir
):
    from safetensors.torch import load_file

    from train import train_controlnet

    data = make_conditioned_imagefolder(tmp_path / "data")
    common = dict(
        use_ema="",
        ema_decay=0.9,
        checkpointing_steps=2,
        cond_dropout_prob=0.5,
        validation_holdout=1,
        validation_prompts=["a red circle"],
        validation_steps=4,
        validation_num_inference_steps=2,
    )

    def flags(steps: int, **more) -> list[str]:
        return [a for a in controlnet_args(tiny_sd_dir, data, **more, max_train_steps=steps, **common) if a]

    whole, split = tmp_path / "whole", tmp_path / "split"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_controlnet.main(flags(4, out=whole)) == 0
        assert train_controlnet.main(flags(2, out=split)) == 0
        assert train_controlnet.main(flags(4, out=split, resume_from_checkpoint="latest")) == 0
    finally:
        torch.set_num_threads(threads)
    for name in ("model.safetensors", "ema.safetensors"):  # the ControlNet only, continued exactly
        a, b = load_file(str(whole / "checkpoint-4" / name)), load_file(str(split / "checkpoint-4" / name))
        assert any(k.endswith("controlnet_mid_block.weight") for k in a) and not any(
            "up_blocks" in k for k in a
        )
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, name
    controlnet = ControlNetModel.from_pretrained(whole)  # the export: EMA weights, diffusers' layout
    ema = load_file(str(whole / "checkpoint-4" / "ema.safetensors"))
    assert torch.equal(
        controlnet.state_dict()["controlnet_mid_block.weight"], ema["controlnet_mid_block.weight"]
    )
    assert (
        float(controlnet.controlnet_mid_block.weight.detach().abs().max()) > 0
    )  # the zero convolutions trained
    assert list(DiffusersControlNet.from_pretrained(whole).config.conditioning_embedding_out_channels) == [
        16,
        32,
        96,
    ]
    assert (whole / "validation" / "step-000004.png").is_file()


def test_controlnet_training_refuses_what_it_cannot_do(tmp_path, tiny_sd_dir):
    from train.arguments import parse_config
    from train.loop_config import ConfigError
    from train.tasks.controlnet import ControlNetTrainConfig

    args = controlnet_args(tiny_sd_dir, tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="--cache_latents is not available"):
        parse_config([*args, "--cache_latents", "--center_crop"], ControlNetTrainConfig)
    with pytest.raises(ConfigError, match="--validation_prompts need condition images"):
        parse_config([*args, "--validation_prompts", "a red circle"], ControlNetTrainConfig)


# ------------------------------------------------------------------------------------------ the layouts demonstration


def test_layouts_are_valid_and_the_detector_reads_rendered_layouts_fully():
    from latentdiff.data.layouts import (
        ORDER_LEVELS,
        layout_caption,
        layout_condition,
        render_layout,
        sample_layout,
    )
    from latentdiff.eval.layouts import score_layout, summarise

    layouts = [sample_layout(np.random.default_rng([7, i]), num_objects=1 + i % 3) for i in range(24)]
    for layout in layouts:
        assert all(0 <= v <= 1 for o in layout.objects for v in o.bbox())
    assert any(len({o.shape for o in x.objects}) < len(x.objects) for x in layouts)  # two circles, say
    assert layout_caption(layouts[2]).count(" and ") == 2 and layout_caption(layouts[2]).endswith(
        "background"
    )
    for layout in layouts[:6]:
        condition = np.asarray(layout_condition(layout))
        assert condition.shape == (64, 64, 3) and (condition[..., 0] == condition[..., 1]).all()  # no colour
        # the k-th object of the caption stands in gray ORDER_LEVELS[k] (its square's centre is inside any shape)
        for o, level in zip(layout.objects, ORDER_LEVELS):
            x, y = (round(v * 64 - 0.5) for v in o.center)
            assert condition[y, x, 0] == level, (layout, o)
    assert summarise([score_layout(render_layout(layout), layout) for layout in layouts])["full_match"] == 1.0
    # the same objects 8 px to the right: colour, shape and size still right, places wrong
    layout = layouts[0]
    shifted = type(layout)(
        layout.background,
        tuple(type(o)(o.color, o.shape, o.size, (o.center[0] + 0.125, o.center[1])) for o in layout.objects),
    )
    result = score_layout(render_layout(shifted), layout)
    assert result["placed"] == 0 and not result["full_match"]
    # a fourth object has no gray level of its own: refused, not dropped from the condition
    four = type(layout)("black", layouts[2].objects + layouts[0].objects[:1])
    with pytest.raises(ValueError, match="1 to 3 objects"):
        layout_condition(four)


def test_layout_dataset_loads_with_its_condition_column(tmp_path):
    from latentdiff.data.dataset import load_image_caption_dataset
    from latentdiff.data.layouts import write_layout_dataset

    dataset = load_image_caption_dataset(train_data_dir=str(write_layout_dataset(tmp_path / "layouts", 3)))
    assert len(dataset) == 3 and {"image", "conditioning_image", "text"} <= set(dataset.column_names)
