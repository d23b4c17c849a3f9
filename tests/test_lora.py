"""LoRA: adapters on the UNet and text encoder (latentdiff.lora), in the pipeline (LoraMixin), in files of every
format (round trip, diffusers' own files and pipeline as the oracle), in training (train/train_lora.py), and bad input.

Tiny models: the UNet of conftest.py's SD folder (2 levels, 32/64 channels), its 2-layer CLIP text encoder.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from latentdiff import lora
from latentdiff.models.unet import ConditionalUNet, UNetConfig
from pipelines.latent_pipeline import LatentPipeline
from tests.test_train import command_line
from train import train_lora
from train.arguments import parse_config
from train.loop_config import ConfigError
from train.tasks.lora import LoraConfig
from train.tasks.t2i_config import T2IConfig

REPO = Path(__file__).resolve().parents[1]

TINY_UNET = UNetConfig(
    sample_size=8,
    block_out_channels=(32, 64),
    attention_levels=(True, False),
    layers_per_block=1,
    num_attention_heads=4,
    cross_attention_dim=32,
    norm_num_groups=8,
)  # the UNet of conftest.py's folder
ALL_UNET_GROUPS = ("attention", "feed_forward", "convolutions")
PROMPTS = ["a red circle in the top left", "a small blue star"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run much faster on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_unet(config: UNetConfig = TINY_UNET, seed: int = 0) -> ConditionalUNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ConditionalUNet(config).eval()


def unet_inputs(
    config: UNetConfig = TINY_UNET, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = seeded(seed)
    sample = torch.randn(2, config.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 5, config.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 700]), context


@torch.no_grad()
def run(unet: nn.Module, inputs) -> torch.Tensor:
    return unet(*inputs)


def as_if_trained(model: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Give every adapter's B random values, as training would (a fresh B is zero and changes nothing)."""
    g = seeded(seed)
    with torch.no_grad():
        for name, parameter in lora.adapter_parameters(model).items():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * std)
    return model


@pytest.fixture(scope="module")
def loaded(tiny_sd_dir) -> LatentPipeline:
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fresh_copy(loaded: LatentPipeline) -> LatentPipeline:
    """A fresh pipeline (copies of the trainable parts, the UNet and the text encoder) over `loaded`'s other parts."""
    fresh = LatentPipeline(
        copy.deepcopy(loaded.unet),
        loaded.scheduler,
        loaded.vae,
        copy.deepcopy(loaded.text_encoder),
        loaded.tokenizer,
    )
    fresh.set_progress_bar_config(disable=True)
    return fresh


@pytest.fixture
def pipe(loaded) -> LatentPipeline:
    """A fresh pipeline for each test: the tests change the models."""
    return fresh_copy(loaded)


def latents(pipe: LatentPipeline, seed: int = 0) -> torch.Tensor:
    """The final latents of a 3-step, guided generation of two prompts: the whole pipeline in one tensor."""
    return pipe(
        PROMPTS, num_inference_steps=3, guidance_scale=5.0, generator=seeded(seed), output_type="latent"
    ).images


def write_adapter(
    folder: Path,
    pipe: LatentPipeline,
    seed: int,
    spec: lora.LoraSpec | None = None,
    text_encoder: bool = False,
) -> Path:
    """An adapter for `pipe`'s models as training would leave it, written with `save_lora`; returns the folder."""
    unet = copy.deepcopy(pipe.unet)
    lora.add_lora(unet, spec or lora.LoraSpec(rank=4, alpha=2.0), generator=seeded(seed))
    as_if_trained(unet, seed)
    encoder = None
    if text_encoder:
        encoder = copy.deepcopy(pipe.text_encoder)
        lora.add_lora(
            encoder, lora.LoraSpec(rank=2, target_modules=lora.TEXT_ENCODER_TARGETS), generator=seeded(seed)
        )
        as_if_trained(encoder, seed + 100, std=0.2)
    lora.save_lora(folder, unet=unet, text_encoder=encoder)
    return folder


def base_state(pipe: LatentPipeline) -> dict[str, torch.Tensor]:
    """The UNet's and text encoder's weights, keyed as the plain modules name them."""
    state = {f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()}
    state.update({f"text_encoder.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()})
    return state


# ---- adapters on a model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [("attention",), ALL_UNET_GROUPS], ids=["default", "all groups"])
def test_only_lora_parameters_train_and_they_are_float32(groups):
    unet = make_unet()
    spec = lora.LoraSpec(rank=4, target_modules=groups)
    targets = lora.check_targets(unet, spec.target_modules)
    wrapped = sorted({name for names in targets.values() for name in names})
    parameters = lora.add_lora(unet, spec, generator=seeded(0))
    trainable = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert sorted(lora.lora_layers(unet)) == wrapped
    assert len(trainable) == len(parameters) == 2 * len(wrapped)  # one A and one B per wrapped layer
    assert all(".lora_A.default." in name or ".lora_B.default." in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in parameters)
    kinds = {type(layer.get_base_layer()) for layer in lora.lora_layers(unet).values()}
    assert kinds == ({nn.Linear} if groups == ("attention",) else {nn.Linear, nn.Conv2d})
    run_loss = unet(*unet_inputs()).square().mean()
    run_loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in unet.parameters())


def test_text_encoder_adapters_wrap_clip_attention(loaded):
    encoder = copy.deepcopy(loaded.text_encoder)
    lora.add_lora(encoder, lora.LoraSpec(rank=2, target_modules=lora.TEXT_ENCODER_TARGETS))
    layers = lora.lora_layers(encoder)
    assert len(layers) == 4 * encoder.config.num_hidden_layers
    assert {name.rsplit(".", 1)[1] for name in layers} == set(lora.TEXT_ENCODER_TARGETS)
    assert all(".lora_" in name for name, p in encoder.named_parameters() if p.requires_grad)


def test_a_fresh_adapter_leaves_outputs_unchanged():
    unet, inputs = make_unet(), unet_inputs()
    before = run(unet, inputs)
    lora.add_lora(unet, lora.LoraSpec(rank=8, alpha=16, target_modules=ALL_UNET_GROUPS), generator=seeded(0))
    assert torch.equal(run(unet, inputs), before)  # B = 0: the update B·A·x is exactly zero
    as_if_trained(unet, seed=1)
    assert (run(unet, inputs) - before).abs().max() > 1e-3  # ... and a trained one does change them


def test_the_generator_makes_the_initial_adapter_reproducible():
    first, second = make_unet(), make_unet()
    lora.add_lora(first, lora.LoraSpec(), generator=seeded(5))
    lora.add_lora(second, lora.LoraSpec(), generator=seeded(5))
    a, b = lora.adapter_state_dict(first), lora.adapter_state_dict(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a[next(k for k in a if "lora_A" in k)].abs().max() > 0  # A is random, B zero
    assert all(not t.any() for k, t in a.items() if "lora_B" in k)


def test_fp16_base_with_fp32_adapters_unscales_under_grad_scaler():
    """Mixed-precision training (GradScaler) refuses float16 gradients: the adapters must be float32 even on a float16
    UNet. peft alone would leave them float16 (the control below)."""
    unet, (sample, timesteps, context) = make_unet().half(), unet_inputs()
    parameters = lora.add_lora(unet, lora.LoraSpec(), generator=seeded(0))
    assert {p.dtype for p in parameters} == {torch.float32}
    assert {p.dtype for name, p in unet.named_parameters() if ".lora_" not in name} == {torch.float16}
    output = unet(sample.half(), timesteps, context.half())
    assert output.dtype == torch.float16
    optimizer = torch.optim.AdamW(parameters)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(output.float().square().mean()).backward()
    scaler.unscale_(optimizer)  # raises "Attempting to unscale FP16 gradients" for float16 parameters
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in parameters)

    from peft import LoraConfig, inject_adapter_in_model

    control = inject_adapter_in_model(
        LoraConfig(r=4, target_modules=list(lora.ATTENTION_TARGETS)), make_unet().half()
    )
    control_parameters = [p for p in control.parameters() if p.requires_grad]
    assert {p.dtype for p in control_parameters} == {torch.float16}
    control_scaler = torch.amp.GradScaler("cpu")
    control_scaler.scale(control(sample.half(), timesteps, context.half()).float().square().mean()).backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        control_scaler.unscale_(torch.optim.AdamW(control_parameters))


# ---- files and the pipeline ---------------------------------------------------------------------------------------


def test_save_then_load_gives_the_trained_models_outputs(pipe, tmp_path):
    source = copy.deepcopy(pipe)
    lora.add_lora(
        source.unet, lora.LoraSpec(rank=4, alpha=2.0, target_modules=ALL_UNET_GROUPS), generator=seeded(0)
    )
    lora.add_lora(source.text_encoder, lora.LoraSpec(rank=2, target_modules=lora.TEXT_ENCODER_TARGETS))
    as_if_trained(source.unet, 1)
    as_if_trained(source.text_encoder, 2, std=0.2)
    path = lora.save_lora(tmp_path / "adapter", unet=source.unet, text_encoder=source.text_encoder)
    expected = latents(source)

    assert path.name == "pytorch_lora_weights.safetensors"
    tensors = load_file(str(path))
    assert all(
        k.startswith(("unet.", "text_encoder.text_model."))
        and k.endswith((".lora_A.weight", ".lora_B.weight"))
        for k in tensors
    )
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert (metadata["unet.r"], metadata["unet.lora_alpha"], metadata["text_encoder.r"]) == (4, 2.0, 2)
    assert json.loads((tmp_path / "adapter" / "lora_config.json").read_text())["unet"]["lora_alpha"] == 2.0

    base = latents(pipe)
    name = pipe.load_lora_weights(tmp_path / "adapter")
    assert name == "default_0" and pipe.get_active_adapters() == ["default_0"]
    assert pipe.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}
    loaded = latents(pipe)
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-6)
    assert (loaded - base).abs().max() > 1e-2  # the adapter (with alpha/r = 0.5 and its text part) matters


def test_fuse_then_unfuse_restores_the_base_weights(pipe, tmp_path):
    before = base_state(pipe)
    pipe.load_lora_weights(write_adapter(tmp_path / "a", pipe, 0, text_encoder=True), scale=0.7)
    with_adapter = latents(pipe)
    pipe.fuse_lora()
    torch.testing.assert_close(
        latents(pipe), with_adapter, rtol=1e-4, atol=1e-4
    )  # the same model, merged (rounding differs)
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    fused = pipe.unet.get_submodule(to_q).get_base_layer().weight
    assert (fused - before[f"unet.{to_q}.weight"]).abs().max() > 1e-4  # the update went into W₀
    pipe.unfuse_lora()
    torch.testing.assert_close(latents(pipe), with_adapter, rtol=1e-4, atol=1e-4)  # applied unfused again
    pipe.unload_lora_weights()  # the plain modules, with the weights unfuse left
    after = base_state(pipe)
    assert sorted(after) == sorted(before)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) <= 1e-5


def test_two_weighted_adapters_add_their_weighted_updates(pipe, tmp_path):
    a = pipe.load_lora_weights(write_adapter(tmp_path / "a", pipe, 0), adapter_name="a")
    b = pipe.load_lora_weights(
        write_adapter(tmp_path / "b", pipe, 1, lora.LoraSpec(rank=2)), adapter_name="b"
    )
    assert pipe.get_active_adapters() == ["a", "b"]  # loading adds to what is applied
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v")
    x = torch.randn(3, 32, generator=seeded(2))

    def output_with(names, weights):
        pipe.set_adapters(names, weights)
        with torch.no_grad():
            return layer(x)

    base, only_a, only_b = output_with([], []), output_with(a, 1.0), output_with(b, 1.0)
    both = output_with([a, b], [0.6, -0.3])
    torch.testing.assert_close(both, base + 0.6 * (only_a - base) - 0.3 * (only_b - base), rtol=0, atol=1e-6)

    def fused_weights(names, weights):  # the whole model in effect: W₀ + Σ s_i Δ_i
        pipe.set_adapters(names, weights)
        pipe.fuse_lora()
        state = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "base_layer" in k}
        pipe.unfuse_lora()
        return state

    w_a, w_b, w_ab = fused_weights(a, 1.0), fused_weights(b, 1.0), fused_weights([a, b], [0.6, -0.3])
    for key, w0 in ((k, v.clone()) for k, v in pipe.unet.state_dict().items() if "base_layer" in k):
        expected = w0 + 0.6 * (w_a[key] - w0) - 0.3 * (w_b[key] - w0)
        torch.testing.assert_close(w_ab[key], expected, rtol=0, atol=1e-5)


def test_weight_zero_is_the_base_model(pipe, tmp_path):
    base = latents(pipe)
    name = pipe.load_lora_weights(write_adapter(tmp_path / "a", pipe, 0, text_encoder=True), scale=0.0)
    assert torch.equal(latents(pipe), base)
    pipe.set_adapters(name, 1.0)
    assert (latents(pipe) - base).abs().max() > 1e-2


def test_disable_then_enable(pipe, tmp_path):
    base = latents(pipe)
    name = pipe.load_lora_weights(write_adapter(tmp_path / "a", pipe, 0, text_encoder=True), scale=0.8)
    with_adapter = latents(pipe)
    pipe.disable_lora()
    assert torch.equal(latents(pipe), base) and pipe.get_active_adapters() == []
    pipe.enable_lora()
    assert torch.equal(latents(pipe), with_adapter) and pipe.get_active_adapters() == [name]
    pipe.fuse_lora()
    pipe.disable_lora()  # unfuses first
    torch.testing.assert_close(latents(pipe), base, rtol=1e-4, atol=1e-4)  # W + BA - BA rounds
    assert all(p.requires_grad is False for n, p in pipe.unet.named_parameters() if ".lora_" in n)


def test_unload_restores_the_base_model_exactly(pipe, tmp_path):
    before_state, base = base_state(pipe), latents(pipe)
    before_types = {n: type(m) for n, m in pipe.unet.named_modules()}
    pipe.load_lora_weights(
        write_adapter(
            tmp_path / "a", pipe, 0, lora.LoraSpec(target_modules=ALL_UNET_GROUPS), text_encoder=True
        )
    )
    pipe.load_lora_weights(write_adapter(tmp_path / "b", pipe, 1), scale=0.5)
    assert not torch.equal(latents(pipe), base)
    pipe.unload_lora_weights()
    after = base_state(pipe)
    assert sorted(after) == sorted(before_state)
    assert all(torch.equal(after[k], before_state[k]) for k in after)
    assert {n: type(m) for n, m in pipe.unet.named_modules()} == before_types
    assert not hasattr(pipe.unet, "peft_config") and not lora.lora_layers(pipe.text_encoder)
    assert torch.equal(latents(pipe), base)  # bit-identical
    assert pipe.get_list_adapters() == {"unet": [], "text_encoder": []}


# ---- diffusers' files and diffusers' pipeline as the oracle ------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_pipeline(tiny_sd_dir):
    """A function building diffusers' StableDiffusionPipeline over the tiny folder, with diffusers' DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    def build():
        scheduler = DDIMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler")
        reference = StableDiffusionPipeline.from_pretrained(
            tiny_sd_dir, scheduler=scheduler, safety_checker=None
        )
        reference.set_progress_bar_config(disable=True)
        return reference

    return build


@pytest.fixture(scope="module")
def diffusers_lora(diffusers_pipeline, tmp_path_factory) -> dict[str, Path]:
    """An SD LoRA made and written by diffusers itself (UNet attention + feed-forward output, rank 4, alpha 8; text
    encoder rank 2), saved by StableDiffusionPipeline.save_lora_weights with its config metadata and without."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = diffusers_pipeline()
    source.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=[*lora.ATTENTION_TARGETS, "ff.net.2"])
    )
    source.text_encoder.add_adapter(
        LoraConfig(r=2, lora_alpha=2, target_modules=list(lora.TEXT_ENCODER_TARGETS))
    )
    as_if_trained(source.unet, 10, std=0.1)
    as_if_trained(source.text_encoder, 11, std=0.2)
    layers = {
        "unet_lora_layers": get_peft_model_state_dict(source.unet),
        "text_encoder_lora_layers": get_peft_model_state_dict(source.text_encoder),
    }
    root = tmp_path_factory.mktemp("diffusers-lora")
    StableDiffusionPipeline.save_lora_weights(
        root / "with-metadata",
        **layers,
        unet_lora_adapter_metadata=source.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=source.text_encoder.peft_config["default"].to_dict(),
    )
    StableDiffusionPipeline.save_lora_weights(
        root / "no-metadata", **layers
    )  # alpha = rank then, diffusers says
    return {"with-metadata": root / "with-metadata", "no-metadata": root / "no-metadata"}


def images(pipeline, seed: int = 0) -> np.ndarray:
    return pipeline(
        PROMPTS, num_inference_steps=4, guidance_scale=6.0, generator=seeded(seed), output_type="np"
    ).images


@pytest.mark.parametrize("variant", ["with-metadata", "no-metadata"])
def test_diffusers_lora_file_gives_diffusers_images(pipe, diffusers_pipeline, diffusers_lora, variant):
    folder = diffusers_lora[variant]
    keys = list(load_file(str(folder / "pytorch_lora_weights.safetensors")))
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    reference = diffusers_pipeline()
    without = images(reference)
    reference.load_lora_weights(folder)
    pipe.load_lora_weights(folder)
    theirs, ours = images(reference), images(pipe)
    assert np.abs(theirs - without).max() > 0.05  # the LoRA changes diffusers' images ...
    assert np.abs(ours - theirs).max() <= 2e-3  # ... and ours the same way


def test_this_projects_adapter_loads_in_diffusers(pipe, diffusers_pipeline, tmp_path):
    folder = write_adapter(
        tmp_path / "ours",
        pipe,
        3,
        lora.LoraSpec(rank=4, alpha=8.0, target_modules=ALL_UNET_GROUPS),
        text_encoder=True,
    )
    reference = diffusers_pipeline()
    reference.load_lora_weights(folder)
    pipe.load_lora_weights(folder, scale=1.0)
    assert np.abs(images(pipe) - images(reference)).max() <= 2e-3


def rewrite(tensors: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """A diffusers LoRA's tensors under the keys of another format."""
    out = {}
    for key, tensor in tensors.items():
        module, role = key.rsplit(".lora_", 1)  # "unet.<module>", "A.weight"
        component, _, name = module.partition(".")
        down_up = "down" if role.startswith("A") else "up"
        if kind == "lora.down":  # diffusers' format before peft
            out[f"{module}.lora.{down_up}.weight"] = tensor
        elif kind == "kohya":  # module names flattened with '_', CLIP's with its text_model. prefix, alphas
            if component == "text_encoder" and not name.startswith("text_model."):
                name = "text_model." + name
            flat = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
            out[f"{flat}.lora_{down_up}.weight"] = tensor
            out[f"{flat}.alpha"] = torch.tensor(8.0 if component == "unet" else 2.0)
        elif kind == "attention processor":  # diffusers' first format: UNet attention only
            match = re.fullmatch(r"(unet\..+)\.(to_q|to_k|to_v|to_out)(\.0)?", module)
            if match:
                out[f"{match[1]}.processor.{match[2]}_lora.{down_up}.weight"] = tensor
        elif kind == "peft" and component == "unet":  # PeftModel(unet).save_pretrained: one model, no prefix
            out[f"base_model.model.{name}.lora_{role}"] = tensor
    return out


def test_older_peft_and_kohya_formats_load_as_the_same_adapter(loaded, diffusers_lora, tmp_path):
    """The diffusers LoRA rewritten in the other formats loads as the same adapter. Kohya's file carries its alphas
    (8 and 2, as the metadata says); the others carry none, so alpha = rank, as diffusers reads them."""
    tensors = load_file(str(diffusers_lora["with-metadata"] / "pytorch_lora_weights.safetensors"))

    def latents_with(state: dict[str, torch.Tensor] | Path, name: str) -> torch.Tensor:
        if isinstance(state, dict):
            path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
            save_file(state, str(path))
            state = path
        fresh = fresh_copy(loaded)
        fresh.load_lora_weights(state)
        return latents(fresh)

    with_alpha = latents_with(diffusers_lora["with-metadata"], "with-metadata")
    alpha_is_rank = latents_with(diffusers_lora["no-metadata"], "no-metadata")
    assert (with_alpha - alpha_is_rank).abs().max() > 1e-3  # alpha matters
    close = dict(rtol=0, atol=1e-6)
    torch.testing.assert_close(latents_with(rewrite(tensors, "kohya"), "kohya"), with_alpha, **close)
    torch.testing.assert_close(
        latents_with(rewrite(tensors, "lora.down"), "lora.down"), alpha_is_rank, **close
    )
    unet_only = latents_with({k: v for k, v in tensors.items() if k.startswith("unet.")}, "unet only")
    torch.testing.assert_close(latents_with(rewrite(tensors, "peft"), "peft"), unet_only, **close)
    attention = {k: v for k, v in tensors.items() if k.startswith("unet.") and "ff.net" not in k}
    torch.testing.assert_close(
        latents_with(rewrite(tensors, "attention processor"), "attention processor"),
        latents_with(attention, "attention"),
        **close,
    )


# ---- bad input ----------------------------------------------------------------------------------------------------


def test_an_adapter_for_other_shapes_is_refused_naming_the_layer(pipe, tmp_path):
    wide = make_unet(UNetConfig(**{**TINY_UNET.__dict__, "cross_attention_dim": 48}))
    lora.add_lora(wide, lora.LoraSpec())
    lora.save_lora(tmp_path / "wide", unet=wide)
    base = latents(pipe)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    with pytest.raises(ValueError, match=rf"does not fit layer '{layer}'.*\(4, 48\).*\(4, 32\)"):
        pipe.load_lora_weights(tmp_path / "wide")
    deeper = make_unet(UNetConfig(**{**TINY_UNET.__dict__, "attention_levels": (True, True)}))
    lora.add_lora(deeper, lora.LoraSpec())
    lora.save_lora(tmp_path / "deeper", unet=deeper)
    with pytest.raises(ValueError, match="layer 'down_blocks.1.attentions.0.*' that the unet does not have"):
        pipe.load_lora_weights(tmp_path / "deeper")
    assert pipe.get_list_adapters() == {"unet": [], "text_encoder": []}  # nothing half-loaded
    assert torch.equal(latents(pipe), base)


def test_a_missing_or_unreadable_adapter_file_is_named(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="no LoRA adapter at '.*nowhere'"):
        pipe.load_lora_weights(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match="no LoRA weights in the folder .*pytorch_lora_weights.safetensors"
    ):
        pipe.load_lora_weights(tmp_path / "empty")
    (tmp_path / "model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        pipe.load_lora_weights(tmp_path / "model.bin")
    save_file({"unet.conv_in.weight": torch.zeros(1)}, str(tmp_path / "not_lora.safetensors"))
    with pytest.raises(ValueError, match="not LoRA weights of a known format.*unet.conv_in.weight"):
        pipe.load_lora_weights(tmp_path / "not_lora.safetensors")


def test_unknown_targets_and_bad_ranks_are_refused():
    unet = make_unet()
    with pytest.raises(
        ValueError, match="'to_qq' matches no nn.Linear or nn.Conv2d layer.*Did you mean 'to_q'"
    ):
        lora.add_lora(unet, lora.LoraSpec(target_modules=["to_q", "to_qq"]))
    with pytest.raises(ValueError, match="'to_out' names ModuleList layers.*'to_out.0'"):
        lora.add_lora(unet, lora.LoraSpec(target_modules=["to_out"]))
    assert not lora.lora_layers(unet)  # refused before anything was wrapped
    for rank in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=rf"rank={rank!r} must be an int >= 1"):
            lora.LoraSpec(rank=rank)
    with pytest.raises(ValueError, match="alpha=0 must be a positive number"):
        lora.LoraSpec(alpha=0)
    with pytest.raises(ValueError, match="dropout=1.0 must be a number in"):
        lora.LoraSpec(dropout=1.0)


def test_pipeline_calls_refuse_bad_names_weights_and_fused_state(pipe, tmp_path):
    folder = write_adapter(tmp_path / "a", pipe, 0)
    name = pipe.load_lora_weights(folder, adapter_name="star")
    with pytest.raises(ValueError, match="adapter_name='star' is already loaded"):
        pipe.load_lora_weights(folder, adapter_name="star")
    with pytest.raises(ValueError, match=r"no adapter named \['moon'\]; loaded: \['star'\]"):
        pipe.set_adapters(["moon"])
    with pytest.raises(ValueError, match="1 names but 2 weights"):
        pipe.set_adapters([name], [1.0, 0.5])
    with pytest.raises(TypeError, match="scale must be a number"):
        pipe.load_lora_weights(folder, scale="0.5")
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="unfuse_lora"):
        pipe.load_lora_weights(folder)
    with pytest.raises(ValueError, match="unfuse_lora"):
        pipe.set_adapters([name], [0.5])


# ---- training: train/train_lora.py --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> Path:
    from tests.test_data import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("lora-data") / "images")


def lora_args(model: Path, data: Path, out: Path, **flags) -> list[str]:
    """Flags of a tiny run: 9 images (one corrupt), batch 2 -> 4 batches per epoch."""
    values = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
        "output_dir": out,
        "resolution": 32,
        "train_batch_size": 2,
        "max_train_steps": 4,
        "learning_rate": 1e-2,
        "lr_warmup_steps": 0,
        "seed": 0,
        "report_to": "none",
        "checkpointing_steps": 100,
        **flags,
    }
    return command_line(values)


def test_lora_flags_extend_the_training_config_and_are_checked_first(tiny_sd_dir, train_data, tmp_path):
    cfg = parse_config(
        lora_args(
            tiny_sd_dir,
            train_data,
            tmp_path,
            rank=8,
            lora_alpha=16,
            lora_targets=["attention", "ff.net.2"],
            train_text_encoder=True,
        ),
        LoraConfig,
    )
    assert isinstance(cfg, T2IConfig) and cfg.learning_rate == 1e-2  # a shared flag
    assert cfg.unet_lora_spec() == lora.LoraSpec(8, 16.0, 0.0, (*lora.ATTENTION_TARGETS, "ff.net.2"))
    assert cfg.text_encoder_lora_spec().target_modules == lora.TEXT_ENCODER_TARGETS
    with pytest.raises(ConfigError, match="rank=0 must be an int >= 1"):
        parse_config(lora_args(tiny_sd_dir, train_data, tmp_path, rank=0), LoraConfig)
    cached = parse_config(
        lora_args(
            tiny_sd_dir, train_data, tmp_path, train_text_encoder=True, cache_latents=True, center_crop=True
        ),
        LoraConfig,
    )
    assert (
        cached.train_text_encoder and cached.cache_latents
    )  # the cache carries the captions for the text encoder
    with pytest.raises(ConfigError, match="--lora_targets: target module 'to_qq'.*Did you mean 'to_q'"):
        train_lora.main(lora_args(tiny_sd_dir, train_data, tmp_path / "run", lora_targets=["to_qq"]))
    assert not (tmp_path / "run").exists()  # refused before the accelerator, the data or a model


def test_train_text_encoder_is_refused_for_a_text_encoder_without_layers(tiny_sd_dir, train_data, tmp_path):
    from transformers import CLIPTextModel

    model = tmp_path / "flat-text-model"
    shutil.copytree(tiny_sd_dir, model)
    text_config = CLIPTextModel.from_pretrained(model / "text_encoder").config
    text_config.num_hidden_layers = 0  # token and position embeddings only, as the embedded default's tower
    shutil.rmtree(model / "text_encoder")
    CLIPTextModel(text_config).save_pretrained(model / "text_encoder")
    with pytest.raises(
        ConfigError, match="text encoder has none \\(0 layers.*leave --train_text_encoder off"
    ):
        train_lora.main(
            lora_args(model, train_data, tmp_path / "run", train_text_encoder=True, max_train_steps=1)
        )


def test_the_star_demonstration_config_is_a_valid_lora_config():
    cfg = parse_config(["--config", str(REPO / "train" / "configs" / "shapes_lora_star.yaml")], LoraConfig)
    assert (
        cfg.pretrained_model_name_or_path == "latentdiff/assets/default"
        and cfg.train_data_dir == "data/stars"
    )
    assert set(lora.ATTENTION_TARGETS) <= set(cfg.unet_lora_spec().target_modules)
    assert any("star" in prompt for prompt in cfg.validation_prompts)


@pytest.mark.slow
def test_lora_run_saves_only_the_adapter_and_resume_equals_the_uninterrupted_run(
    tmp_path, tiny_sd_dir, train_data
):
    common = dict(
        rank=4,
        lora_alpha=8,
        lora_targets=["attention", "ff.net.2"],
        train_text_encoder=True,
        use_ema=True,
        ema_decay=0.9,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=2,
        checkpointing_steps=3,
        random_flip=True,
        validation_prompts=["a red star"],
        validation_steps=6,
        validation_num_inference_steps=2,
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train_lora.main(lora_args(tiny_sd_dir, train_data, whole, max_train_steps=6, **common)) == 0
    assert train_lora.main(lora_args(tiny_sd_dir, train_data, split, max_train_steps=3, **common)) == 0
    assert (
        train_lora.main(
            lora_args(
                tiny_sd_dir, train_data, split, max_train_steps=6, resume_from_checkpoint="latest", **common
            )
        )
        == 0
    )
    # checkpoints hold the adapters only (not the frozen model), and resume continues them exactly
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(whole / "checkpoint-6" / name)), load_file(str(split / "checkpoint-6" / name))
        assert sorted(a) == sorted(b) and all(".lora_" in k for k in a), name
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, name
    adapter = whole / "pytorch_lora_weights.safetensors"
    a, b = load_file(str(adapter)), load_file(str(split / "pytorch_lora_weights.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert sorted(p.name for p in whole.iterdir() if p.is_file()) == [
        "README.md",  # the model card, naming the base model
        "lora_config.json",
        "pytorch_lora_weights.safetensors",
        "train_config.yaml",
    ]  # no model folder
    assert f'base_model: "{tiny_sd_dir}"' in (whole / "README.md").read_text()
    assert (whole / "validation" / "step-000006.png").is_file()
    assert any(k.startswith("text_encoder.") for k in a) and any("ff.net.2" in k for k in a)
    assert all(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # every B trained away from 0
    # the exported adapter is the EMA of the last checkpoint, and loads in the pipeline
    ema = load_file(str(whole / "checkpoint-6" / "ema.safetensors"))
    ema_to_q = next(
        v for k, v in ema.items() if k.endswith("attn1.to_q.lora_A.default.weight") and "down_blocks" in k
    )
    assert torch.equal(
        a["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"], ema_to_q
    )
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    base = latents(pipe)
    pipe.load_lora_weights(whole)
    assert (latents(pipe) - base).abs().max() > 1e-3


def test_kohya_save_format_loads_back_to_the_same_images(pipe, loaded, tmp_path):
    """An adapter (UNet with a per-module alpha, and text encoder) written in kohya's keys reads back, through the
    kohya reader, as the very adapter written in diffusers' keys: the same images."""
    unet = copy.deepcopy(pipe.unet)
    spec = lora.LoraSpec(rank=4, alpha=2.0, target_modules=(*lora.ATTENTION_TARGETS, "ff.net.2"))
    lora.add_lora(unet, spec, generator=seeded(1))
    unet.peft_config["default"].alpha_pattern = {"ff.net.2": 8.0}  # a module with its own alpha
    as_if_trained(unet, 1)
    encoder = copy.deepcopy(pipe.text_encoder)
    lora.add_lora(
        encoder, lora.LoraSpec(rank=2, target_modules=lora.TEXT_ENCODER_TARGETS), generator=seeded(2)
    )
    as_if_trained(encoder, 2, std=0.2)
    for save_format in lora.SAVE_FORMATS:
        lora.save_lora(tmp_path / save_format, unet=unet, text_encoder=encoder, save_format=save_format)
    keys = load_file(str(tmp_path / "kohya" / lora.LORA_WEIGHTS_NAME))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    ff = next(v for k, v in keys.items() if k.endswith("ff_net_2.alpha"))
    assert float(ff) == 8.0 and float(keys[next(k for k in keys if k.endswith("to_q.alpha"))]) == 2.0

    def images_with(folder: Path) -> np.ndarray:
        fresh = fresh_copy(loaded)
        fresh.load_lora_weights(folder)
        return images(fresh)

    diffusers_images, kohya_images = images_with(tmp_path / "diffusers"), images_with(tmp_path / "kohya")
    assert np.abs(diffusers_images - images(pipe)).max() > 0.05  # the adapter matters ...
    np.testing.assert_allclose(
        kohya_images, diffusers_images, rtol=0, atol=1e-5
    )  # ... and reads back the same
    (
        tmp_path / "kohya" / lora.LORA_CONFIG_NAME
    ).unlink()  # the web UI's folder has the file alone: alphas inside
    np.testing.assert_allclose(images_with(tmp_path / "kohya"), diffusers_images, rtol=0, atol=1e-5)


def test_train_lora_save_format_kohya_writes_kohya_keys(tiny_sd_dir, train_data, tmp_path):
    out = tmp_path / "run"
    assert (
        train_lora.main(lora_args(tiny_sd_dir, train_data, out, max_train_steps=1, save_format="kohya")) == 0
    )
    keys = load_file(str(out / lora.LORA_WEIGHTS_NAME))
    assert keys and all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    pipe = LatentPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_lora_weights(out)
    assert pipe.get_list_adapters()["unet"] == ["default_0"]
