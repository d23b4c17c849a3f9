"""LatentPipeline and generate(): parity with diffusers' StableDiffusionPipeline, behaviour, bad input.

Everything runs on the tiny diffusers-written SD folder of conftest.py (32 px images, a few steps).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as DiffusersDDIM
from diffusers import DDPMScheduler as DiffusersDDPM
from diffusers import StableDiffusionPipeline
from PIL import Image

import pipelines.latent_pipeline as latent_pipeline_module
from latentdiff import cli, default_model
from latentdiff.conditioning import decode_latents, encode_prompts
from latentdiff.generate import generate
from latentdiff.schedulers import DDIMScheduler, DDPMScheduler
from pipelines import LatentPipeline
from pipelines.latent_pipeline import rescale_guidance

PROMPTS = ["a red circle in the top left", "a small blue square on a white background"]
STEPS = 4
SIDE = 32  # the tiny model's default image side (UNet sample_size 8 x VAE factor 4)
LATENT_SHAPE = (4, SIDE // 4, SIDE // 4)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *LATENT_SHAPE, generator=seeded(seed))


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir) -> LatentPipeline:
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(tiny_sd_dir) -> StableDiffusionPipeline:
    """diffusers' own pipeline over the same folder with diffusers' DDIM (the oracle).

    clip_sample=False: the folder's PNDM config does not set it; StableDiffusionPipeline would turn DDIM's default
    True off (with a FutureWarning), and LatentPipeline reads an unset clip_sample as False.
    """
    ddim = DiffusersDDIM.from_pretrained(tiny_sd_dir, subfolder="scheduler", clip_sample=False)
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, scheduler=ddim, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    return reference


def with_sampler(pipe: LatentPipeline, scheduler_class) -> LatentPipeline:
    """The same parts with another sampler built from the pipeline's scheduler config."""
    other = LatentPipeline(
        pipe.unet,
        scheduler_class.from_config(pipe.scheduler.config),
        pipe.vae,
        pipe.text_encoder,
        pipe.tokenizer,
    )
    other.set_progress_bar_config(disable=True)
    return other


# ------------------------------------------------------------------------------------------ parity with diffusers

PARITY_CASES = {
    "two prompts, negatives, cfg": dict(
        prompt=PROMPTS, negative_prompt=["a green triangle", "a black background"], guidance_scale=6.0
    ),
    "two prompts, 2 images each, rescale, eta=1": dict(
        prompt=PROMPTS, num_images_per_prompt=2, guidance_scale=7.5, guidance_rescale=0.7, eta=1.0
    ),
    "no guidance": dict(prompt=PROMPTS, guidance_scale=1.0),
}


@pytest.mark.parametrize("case", PARITY_CASES, ids=list(PARITY_CASES))
def test_images_match_stable_diffusion_pipeline(pipe, reference, case):
    arguments = dict(PARITY_CASES[case], num_inference_steps=STEPS, output_type="np")
    ours = pipe(**arguments, generator=seeded(0)).images
    theirs = reference(**arguments, generator=seeded(0)).images
    batch = len(arguments["prompt"]) * arguments.get("num_images_per_prompt", 1)
    assert ours.shape == (batch, SIDE, SIDE, 3)
    assert ours.std() > 0.01  # a real image, not a constant
    assert np.abs(ours - theirs).max() <= 2e-3


def test_same_initial_latents_give_stable_diffusions_images(pipe, reference):
    arguments = dict(prompt=PROMPTS, num_inference_steps=STEPS, output_type="np", latents=noise(2))
    ours = pipe(**arguments, negative_prompt="a green star").images  # one negative for both prompts
    theirs = reference(**arguments, negative_prompt=["a green star"] * 2).images
    assert np.abs(ours - theirs).max() <= 2e-3


def test_ddpm_sampler_matches_diffusers_ddpm(pipe, reference):
    ddpm = with_sampler(pipe, DDPMScheduler)
    reference_ddpm = StableDiffusionPipeline(
        **{
            **reference.components,
            "scheduler": DiffusersDDPM.from_config(reference.scheduler.config, clip_sample=False),
        }
    )
    reference_ddpm.set_progress_bar_config(disable=True)
    arguments = dict(prompt=PROMPTS[0], num_inference_steps=STEPS, output_type="np")
    ours = ddpm(**arguments, generator=seeded(3)).images
    theirs = reference_ddpm(**arguments, generator=seeded(3)).images
    assert np.abs(ours - theirs).max() <= 2e-3
    ddim = pipe(**arguments, generator=seeded(3)).images
    assert np.abs(ours - ddim).max() > 1e-2  # the sampler matters


# ---------------------------------------------------------------------------------------------------- behaviour


def test_same_seed_same_image_other_seed_other_image(pipe):
    arguments = dict(prompt=PROMPTS[0], num_inference_steps=STEPS, output_type="np")
    first = pipe(**arguments, generator=seeded(1)).images
    again = pipe(**arguments, generator=seeded(1)).images
    other = pipe(**arguments, generator=seeded(2)).images
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-2


@pytest.mark.parametrize("sampler", [DDIMScheduler, DDPMScheduler])
def test_two_prompts_at_once_equal_each_alone(pipe, sampler):
    pipe = with_sampler(pipe, sampler)
    arguments = dict(num_inference_steps=STEPS, output_type="np", eta=1.0)
    together = pipe(PROMPTS, generator=[seeded(0), seeded(1)], **arguments).images
    alone = [pipe(prompt, generator=seeded(i), **arguments).images[0] for i, prompt in enumerate(PROMPTS)]
    np.testing.assert_allclose(together, np.stack(alone), rtol=0, atol=1e-4)


def test_prompt_and_negative_prompt_change_the_image(pipe):
    arguments = dict(num_inference_steps=STEPS, output_type="np", latents=noise(1))
    base = pipe(PROMPTS[0], **arguments).images
    assert np.abs(base - pipe(PROMPTS[1], **arguments).images).max() > 1e-3
    assert np.abs(base - pipe(PROMPTS[0], negative_prompt="a green star", **arguments).images).max() > 1e-3


def test_guidance_at_most_one_runs_the_conditional_branch_alone(pipe):
    batch_sizes = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        arguments = dict(num_inference_steps=STEPS, output_type="latent", latents=noise(1))
        guided = pipe(PROMPTS[0], guidance_scale=7.5, **arguments).images
        assert batch_sizes == [2] * STEPS  # cond and uncond in one batch
        batch_sizes.clear()
        unguided = pipe(PROMPTS[0], guidance_scale=1.0, **arguments).images
        assert batch_sizes == [1] * STEPS
        ignored_negative = pipe(PROMPTS[0], guidance_scale=1.0, negative_prompt="a star", **arguments).images
    finally:
        hook.remove()
    assert torch.equal(unguided, ignored_negative)
    assert (guided - unguided).abs().max() > 1e-3


def test_guidance_rescale_is_lin_et_al_eq_16():
    guided = torch.randn(2, 4, 8, 8, generator=seeded(0)) * 3
    cond = torch.randn(2, 4, 8, 8, generator=seeded(1))
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.0), guided)
    fully = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(fully.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))  # σ_pos, per sample
    torch.testing.assert_close(fully / guided, (fully / guided)[:, :1, :1, :1].expand_as(guided))  # a rescale
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.25), 0.25 * fully + 0.75 * guided)


def test_default_size_comes_from_unet_and_vae_and_other_sizes_work(pipe):
    assert pipe(PROMPTS[0], num_inference_steps=1, output_type="np").images.shape == (1, SIDE, SIDE, 3)
    images = pipe(PROMPTS[0], num_inference_steps=1, height=24, width=40, output_type="np").images
    assert images.shape == (1, 24, 40, 3)


def test_output_types_agree(pipe):
    arguments = dict(prompt=PROMPTS, num_inference_steps=STEPS, latents=noise(2))
    latents = pipe(**arguments, output_type="latent").images
    pt = pipe(**arguments, output_type="pt").images
    np_images = pipe(**arguments, output_type="np").images
    pil = pipe(**arguments, output_type="pil").images
    assert latents.shape == (2, *LATENT_SHAPE)
    assert pt.shape == (2, 3, SIDE, SIDE) and 0 <= pt.min() and pt.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close((decode_latents(pipe.vae, latents) / 2 + 0.5).clamp(0, 1), pt)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
    assert np_images.dtype == np.float32
    assert all(isinstance(image, Image.Image) and image.size == (SIDE, SIDE) for image in pil)
    np.testing.assert_array_equal(np.stack([np.asarray(image) for image in pil]), (np_images * 255).round())


def test_prompt_embeds_give_the_prompts_images(pipe):
    arguments = dict(num_inference_steps=STEPS, output_type="np", latents=noise(2))
    with torch.no_grad():
        embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, PROMPTS)
        empty = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["", ""])
    from_text = pipe(PROMPTS, **arguments).images
    np.testing.assert_allclose(pipe(prompt_embeds=embeds, **arguments).images, from_text, rtol=0, atol=1e-6)
    with_negatives = pipe(prompt_embeds=embeds, negative_prompt_embeds=empty, **arguments).images
    np.testing.assert_allclose(with_negatives, from_text, rtol=0, atol=1e-6)


def test_callback_sees_every_step_and_can_replace_latents(pipe):
    seen = []

    def callback(pipeline, i, t, tensors):
        seen.append((pipeline, i, int(t), tensors["latents"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == STEPS - 1 else None

    latents = pipe(
        PROMPTS[0], num_inference_steps=STEPS, output_type="latent", callback_on_step_end=callback
    ).images
    pipe.scheduler.set_timesteps(STEPS)
    assert [(p, i, t) for p, i, t, _ in seen] == [
        (pipe, i, int(t)) for i, t in enumerate(pipe.scheduler.timesteps)
    ]
    assert all(shape == (1, *LATENT_SHAPE) for *_, shape in seen)
    assert torch.equal(latents, torch.zeros(1, *LATENT_SHAPE))


def test_progress_bar_shows_the_steps_and_can_be_disabled(pipe, capsys):
    pipe.set_progress_bar_config()
    try:
        pipe(PROMPTS[0], num_inference_steps=2, output_type="latent")
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "2/2" in capsys.readouterr().err
    pipe(PROMPTS[0], num_inference_steps=2, output_type="latent")
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------------ loading


def test_from_pretrained_reads_a_diffusers_folder_with_this_projects_parts(pipe, tiny_sd_dir):
    from latentdiff.models.unet import ConditionalUNet

    assert json.loads((tiny_sd_dir / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == (
        "PNDMScheduler"
    )
    assert isinstance(pipe.unet, ConditionalUNet) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert (
        pipe.scheduler.config.clip_sample is False
    )  # not set in the folder: latents are not clamped to [-1, 1]
    chosen = DDPMScheduler.from_config(pipe.scheduler.config)
    assert LatentPipeline.from_pretrained(tiny_sd_dir, scheduler=chosen).scheduler is chosen


def test_torch_dtype_applies_to_every_model(tiny_sd_dir):
    half = LatentPipeline.from_pretrained(tiny_sd_dir, torch_dtype=torch.bfloat16)
    assert {half.unet.dtype, half.vae.dtype, half.text_encoder.dtype} == {torch.bfloat16}


def test_save_pretrained_round_trip_and_diffusers_reads_it(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    model_index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert model_index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert model_index["scheduler"] == ["diffusers", "DDIMScheduler"]
    arguments = dict(prompt=PROMPTS, num_inference_steps=STEPS, output_type="np", latents=noise(2))
    before = pipe(**arguments).images
    again = LatentPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(again(**arguments).images, before)
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.scheduler).__name__ == "DDIMScheduler"
    assert np.abs(theirs(**arguments).images - before).max() <= 2e-3


def test_no_argument_loads_the_embedded_default_or_says_what_to_pass(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(latent_pipeline_module, "DEFAULT_MODEL_DIR", tmp_path / "no-default")
    with pytest.raises(FileNotFoundError, match=r"from_pretrained\(") as error:
        LatentPipeline()
    assert "unet, scheduler, vae, text_encoder, tokenizer" in str(error.value)
    pipe.save_pretrained(tmp_path / "default")
    monkeypatch.setattr(latent_pipeline_module, "DEFAULT_MODEL_DIR", tmp_path / "default")
    default = LatentPipeline()
    assert default.unet.config == pipe.unet.config


def test_some_parts_missing_is_a_type_error(pipe):
    with pytest.raises(TypeError, match="vae, text_encoder"):
        LatentPipeline(pipe.unet, pipe.scheduler, tokenizer=pipe.tokenizer)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "arguments, error, names",
    [
        (dict(height=30), ValueError, "height=30"),
        (dict(width=SIDE + 2), ValueError, f"width={SIDE + 2}"),
        (dict(prompt=PROMPTS, negative_prompt=["x", "y", "z"]), ValueError, "negative_prompt has 3"),
        (dict(latents=torch.zeros(1, 3, 8, 8)), ValueError, "latents has shape"),
        (dict(prompt=PROMPTS, latents=noise(1)), ValueError, "latents has shape"),
        (dict(latents=torch.zeros(4, 8, 8)), ValueError, "latents must be"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps=0"),
        (dict(num_inference_steps=1001), ValueError, "num_inference_steps=1001"),
        (dict(num_inference_steps=2.5), TypeError, "num_inference_steps"),
        (dict(prompt=[]), ValueError, "prompt is an empty list"),
        (dict(prompt=None), ValueError, "prompt"),
        (dict(prompt=3), TypeError, "prompt must be"),
        (dict(prompt=PROMPTS, generator=[seeded(0)] * 3), ValueError, "generator is a list of 3"),
        (dict(negative_prompt_embeds=torch.zeros(1, 5, 32)), ValueError, "negative_prompt_embeds"),
        (dict(output_type="jpg"), ValueError, "output_type='jpg'"),
        (dict(guidance_rescale=1.5), ValueError, "guidance_rescale=1.5"),
        (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt=0"),
    ],
)
def test_bad_arguments_name_themselves(pipe, arguments, error, names):
    arguments = {"prompt": PROMPTS[0], "num_inference_steps": 1, **arguments}
    with pytest.raises(error, match=names.replace("(", r"\(").replace("[", r"\[")):
        pipe(**arguments)


def test_folder_missing_unet_is_named(tiny_sd_dir, tmp_path):
    broken = shutil.copytree(tiny_sd_dir, tmp_path / "broken")
    shutil.rmtree(broken / "unet")
    with pytest.raises(ValueError, match=r"lacks unet/"):
        LatentPipeline.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        LatentPipeline.from_pretrained(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------- generate


def test_generate_writes_the_image_the_pipeline_makes(pipe, tiny_sd_dir, tmp_path):
    paths = generate(PROMPTS[0], tmp_path / "out.png", model=tiny_sd_dir, steps=STEPS, seed=7)
    assert paths == [tmp_path / "out.png"]
    with Image.open(paths[0]) as image:
        assert image.text["seed"] == "7" and image.text["prompt"] == PROMPTS[0]
        written = np.asarray(image.convert("RGB"))
    expected = pipe(PROMPTS[0], num_inference_steps=STEPS, generator=[seeded(7)]).images[0]
    np.testing.assert_array_equal(written, np.asarray(expected))


def test_generate_compile_samples_through_one_compiled_graph(tiny_sd_dir, tmp_path, eager_compile):
    """`latentdiff generate --compile` runs the UNet as one torch.compile graph (fullgraph=True: a graph break would
    raise) and draws the same image. Inductor's code generation is swapped for dynamo's eager backend, which traces
    and guards the same graph in seconds instead of minutes."""
    asked = eager_compile  # the keyword arguments of each torch.compile call
    args = ["generate", PROMPTS[0], "--model", str(tiny_sd_dir), "--steps", "2", "--seed", "3"]
    assert cli.main([*args, "-o", str(tmp_path / "plain.png")]) == 0
    assert asked == [] and not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert cli.main([*args, "-o", str(tmp_path / "compiled.png"), "--compile"]) == 0
    assert asked == [{"fullgraph": True}] and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    plain, compiled = (
        np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB")) for n in ("plain", "compiled")
    )
    np.testing.assert_array_equal(compiled, plain)


def test_generate_several_images_as_grid_or_numbered_files(tiny_sd_dir, tmp_path):
    arguments = dict(model=tiny_sd_dir, steps=2, seed=10, num_images=3, sampler="ddpm")
    [grid] = generate(PROMPTS[0], tmp_path / "grid.png", **arguments)
    files = generate(PROMPTS[0], tmp_path / "many.png", grid=False, **arguments)
    assert files == [tmp_path / f"many-{i}.png" for i in (1, 2, 3)]
    with Image.open(grid) as image:
        assert image.size == (2 * SIDE, 2 * SIDE)  # 2 x 2 tiles for 3 images
        tiles = np.asarray(image.convert("RGB"))
    second = np.asarray(Image.open(files[1]).convert("RGB"))
    np.testing.assert_array_equal(tiles[:SIDE, SIDE:], second)  # tile 2 is image 2
    alone = generate(PROMPTS[0], tmp_path / "alone.png", **{**arguments, "seed": 11, "num_images": 1})
    assert np.abs(np.asarray(Image.open(alone[0])).astype(int) - second).max() <= 1  # image i uses seed + i


def test_generate_checks_the_output_folder_before_loading_a_model(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(LatentPipeline, "from_pretrained", no_loading)
    monkeypatch.setattr(LatentPipeline, "__init__", no_loading)
    with pytest.raises(ValueError, match="does not exist"):
        generate("a red circle", tmp_path / "missing-folder" / "out.png", model="any")
    with pytest.raises(ValueError, match="is a folder"):
        generate("a red circle", tmp_path, model="any")
    with pytest.raises(ValueError, match="sampler='lms' is unknown"):
        generate("a red circle", tmp_path / "out.png", sampler="lms")
    with pytest.raises(ValueError, match="no Karras sigmas"):
        generate("a red circle", tmp_path / "out.png", sampler="euler_a", karras=True)
    with pytest.raises(ValueError, match="steps=0"):
        generate("a red circle", tmp_path / "out.png", steps=0)
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_DIR", tmp_path / "no-default")
    with pytest.raises(ValueError, match="--model"):
        generate("a red circle", tmp_path / "out.png")


def test_the_text_encoder_loads_as_transformers_loads_it(tiny_sd_dir, tmp_path):
    """load_text_encoder builds CLIPTextModel from its config and the stored tensors: the same parameters, position
    ids and outputs as CLIPTextModel.from_pretrained; a sharded folder goes through from_pretrained."""
    from transformers import CLIPTextModel

    from pipelines.loading import load_text_encoder

    folder = tiny_sd_dir / "text_encoder"
    ours, theirs = load_text_encoder(folder), CLIPTextModel.from_pretrained(folder).eval()
    assert not ours.training and ours.dtype == torch.float32
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(t, theirs.state_dict()[n]) for n, t in ours.state_dict().items())
    assert [torch.equal(a, b) for a, b in zip(ours.buffers(), theirs.buffers())] == [True]  # position ids
    ids = torch.randint(0, ours.config.vocab_size, (2, ours.config.max_position_embeddings))
    assert torch.equal(ours(ids).last_hidden_state, theirs(ids).last_hidden_state)
    assert load_text_encoder(folder, torch.bfloat16).dtype == torch.bfloat16
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    sharded = load_text_encoder(tmp_path / "sharded")
    assert torch.equal(sharded(ids).last_hidden_state, theirs(ids).last_hidden_state)
