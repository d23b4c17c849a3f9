"""ConditionalUNet: parity with diffusers' UNet2DConditionModel, behaviour, files, bad input."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from latentdiff import ConditionalUNet, UNetConfig
from latentdiff.models.attention import _GatedGELU
from latentdiff.models.unet import timestep_embedding

TEXT_DIM = 24

# Tiny diffusers configs covering both Stable Diffusion layouts and the options in between.
SD1_STYLE = dict(  # 1x1-conv projections, one head count for every level, 2 ResBlocks per level
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=4,  # diffusers' name for the head count
    cross_attention_dim=TEXT_DIM,
    norm_num_groups=8,
    sample_size=16,
)
SD2_STYLE = dict(  # linear projections, per-level head counts, upcast attention, other in/out channel counts
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    upcast_attention=True,
    cross_attention_dim=TEXT_DIM,
    norm_num_groups=8,
    in_channels=3,
    out_channels=5,
)
THREE_LEVELS = dict(  # per-level ResBlock and transformer counts, no mid attention, [sin, cos] with shift 1
    block_out_channels=(16, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2D",
    layers_per_block=(1, 2, 1),
    transformer_layers_per_block=(1, 2, 1),
    attention_head_dim=2,
    flip_sin_to_cos=False,
    freq_shift=1,
    cross_attention_dim=TEXT_DIM,
    norm_num_groups=8,
    norm_eps=1e-6,
)
TINY = UNetConfig(
    sample_size=8,
    block_out_channels=(16, 32),
    attention_levels=(True, False),
    layers_per_block=1,
    num_attention_heads=2,
    cross_attention_dim=TEXT_DIM,
    norm_num_groups=8,
)
# The unet/config.json files of Stable Diffusion 1.5 and 2.1 in the diffusers layout, as published.
SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_CONFIG = {
    **SD15_CONFIG,
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random norm scales and biases (default init leaves them at 1 and 0), so every parameter matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return model


def inputs(batch: int = 2, channels: int = 4, size: tuple[int, int] = (16, 16), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, channels, *size, generator=generator)
    context = torch.randn(batch, 7, TEXT_DIM, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    return sample, timesteps, context


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tiny() -> ConditionalUNet:
    torch.manual_seed(0)
    return randomize_(ConditionalUNet(TINY)).eval()


# ---- parity with diffusers ----


@pytest.mark.parametrize("config", [SD1_STYLE, SD2_STYLE, THREE_LEVELS], ids=["sd1", "sd2", "three_levels"])
def test_loads_diffusers_folder_and_matches_its_output(tmp_path, config):
    torch.manual_seed(0)
    reference = randomize_(UNet2DConditionModel(**config)).eval()
    reference.save_pretrained(tmp_path)
    model = ConditionalUNet.from_pretrained(tmp_path)

    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    sample, timesteps, context = inputs(channels=reference.config.in_channels)
    with torch.no_grad():
        ours, theirs = model(sample, timesteps, context), reference(sample, timesteps, context).sample
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    # 1e-5, tighter than the 1e-4 asked for: the difference is about 5e-7 here, and a subtly different layer
    # (tanh-approximated GELU in the feed-forward, say) already costs 4e-5.
    assert relative_error(ours, theirs) < 1e-5
    # The loaded model is not just any model that happens to fit: another timestep changes the output.
    with torch.no_grad():
        assert relative_error(model(sample, timesteps + 100, context), theirs) > 1e-2


def test_gradients_match_diffusers(tmp_path):
    torch.manual_seed(0)
    reference = randomize_(UNet2DConditionModel(**SD1_STYLE)).train()
    reference.save_pretrained(tmp_path)
    model = ConditionalUNet.from_pretrained(tmp_path).train()
    sample, timesteps, context = inputs()
    model(sample, timesteps, context).square().mean().backward()
    reference(sample, timesteps, context).sample.square().mean().backward()
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert relative_error(p.grad, theirs[name].grad) < 1e-4, name


def test_gated_gelu_backward_is_the_derivative():
    """GEGLU recomputes GELU(gate) in its backward pass instead of storing it: check that against autograd."""
    generator = torch.Generator().manual_seed(0)
    projection = torch.randn(2, 3, 10, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(_GatedGELU.apply, (projection,))


def test_diffusers_loads_what_save_pretrained_writes(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    reference = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    sample, timesteps, context = inputs()
    with torch.no_grad():
        assert (
            relative_error(tiny(sample, timesteps, context), reference(sample, timesteps, context).sample)
            < 1e-4
        )


@pytest.mark.parametrize("published", [SD15_CONFIG, SD21_CONFIG], ids=["sd15", "sd21"])
def test_stable_diffusion_configs_give_diffusers_parameters(published):
    """Same parameter names and shapes as diffusers' UNet for the real SD configs (on the meta device)."""
    config = UNetConfig.from_diffusers(published)
    with torch.device("meta"):
        ours = ConditionalUNet(config)
        theirs = UNet2DConditionModel(**{k: v for k, v in published.items() if not k.startswith("_")})
    assert {n: p.shape for n, p in ours.state_dict().items()} == {
        n: p.shape for n, p in theirs.state_dict().items()
    }
    assert UNetConfig.from_diffusers(config.to_diffusers()) == config


def test_sd21_config_reads_attention_head_dim_as_head_count():
    config = UNetConfig.from_diffusers(SD21_CONFIG)
    assert config.heads == (5, 10, 20, 20)  # 64 channels per head on every level
    assert config.use_linear_projection and config.upcast_attention and config.cross_attention_dim == 1024


def test_timestep_embedding_is_the_sinusoid():
    t = torch.tensor([0.0, 10.0])
    emb = timestep_embedding(t, 8, flip_sin_to_cos=True, freq_shift=0)  # frequencies 10000^(-j/4), j = 0..3
    angles = t[:, None] * torch.tensor([1.0, 0.1, 0.01, 0.001])
    torch.testing.assert_close(emb, torch.cat([angles.cos(), angles.sin()], dim=1))
    assert timestep_embedding(t, 9).shape == (2, 9)


# ---- behaviour ----


@pytest.mark.parametrize("size", [(8, 8), (16, 24), (32, 8)])
def test_output_shape_equals_input_shape(tiny, size):
    sample, timesteps, context = inputs(size=size)
    with torch.no_grad():
        assert tiny(sample, timesteps, context).shape == sample.shape


def test_text_embeddings_change_the_output(tiny):
    sample, timesteps, context = inputs()
    other_context = inputs(seed=1)[2]  # another text, not a shuffle: attention ignores the token order
    with torch.no_grad():
        a, b = tiny(sample, timesteps, context), tiny(sample, timesteps, other_context)
    assert relative_error(a, b) > 1e-3


def test_timestep_forms_agree(tiny):
    sample, _, context = inputs()
    with torch.no_grad():
        expected = tiny(sample, torch.tensor([37, 37]), context)
        for timestep in (37, 37.0, torch.tensor(37), torch.tensor([37])):
            torch.testing.assert_close(tiny(sample, timestep, context), expected)
        assert relative_error(tiny(sample, 500, context), expected) > 1e-3


def test_gradients_reach_every_parameter(tiny):
    model = copy.deepcopy(tiny).train()
    sample, timesteps, context = inputs()
    model(sample, timesteps, context).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    plain, checkpointed = copy.deepcopy(tiny).train(), copy.deepcopy(tiny).train()
    checkpointed.enable_gradient_checkpointing()
    calls = []
    checkpointed.down_blocks[0].resnets[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    sample, timesteps, context = inputs()
    for model in (plain, checkpointed):
        model(sample, timesteps, context).square().mean().backward()
    assert len(calls) == 2  # the forward ran again in the backward pass: checkpointing is on
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compiles_as_one_graph(tiny):
    """torch.compile(fullgraph=True) needs the whole forward traced as one graph: for sampling (no grad), and for
    training with gradient checkpointing, where dynamo also traces GEGLU's custom backward and the checkpoints.
    dynamo's explain traces without compiling (seconds, where inductor's compile takes minutes on a CPU)."""
    sample, timesteps, context = inputs(size=(8, 8))
    training = copy.deepcopy(tiny).train()
    training.enable_gradient_checkpointing()
    with torch.no_grad():
        sampling = torch._dynamo.explain(tiny)(sample, timesteps, context)
    train = torch._dynamo.explain(training)(sample, timesteps, context)
    for explanation in (sampling, train):
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_save_load_round_trip_is_identical(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "model")
    assert (
        json.loads((tmp_path / "model" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    )
    loaded = ConditionalUNet.from_pretrained(tmp_path, subfolder="model")
    assert loaded.config == tiny.config and not loaded.training
    sample, timesteps, context = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(sample, timesteps, context), tiny(sample, timesteps, context))


def test_upcast_attention_runs_softmax_in_float32(monkeypatch):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional,
        "scaled_dot_product_attention",
        lambda q, k, v: seen.append(q.dtype) or sdpa(q, k, v),
    )
    config = dataclasses.replace(TINY, upcast_attention=True)
    model = ConditionalUNet(config).to(torch.bfloat16)
    sample, timesteps, context = inputs()
    with torch.no_grad():
        out = model(sample.bfloat16(), timesteps, context.bfloat16())
    assert out.dtype == torch.bfloat16 and set(seen) == {torch.float32}


def test_dtype_passes_through(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    half = ConditionalUNet.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.device == torch.device("cpu")
    sample, timesteps, context = inputs()
    with torch.no_grad():
        out = half(sample.bfloat16(), timesteps, context.bfloat16())
        double = copy.deepcopy(tiny).double()(sample.double(), timesteps, context.double())
    assert out.dtype == torch.bfloat16 and double.dtype == torch.float64
    assert relative_error(out.float(), double.float()) < 5e-2


def test_downsample_factor(tiny):
    assert tiny.downsample_factor == 2
    assert ConditionalUNet(UNetConfig.from_diffusers(THREE_LEVELS)).downsample_factor == 4


# ---- files and configs it refuses ----


def test_safetensors_reader_reads_what_safetensors_wrote(tmp_path):
    """The reader that loads weights without a second copy gives safetensors' own tensors, in every dtype and shape
    (0-d, empty), and casts only floating-point ones."""
    from safetensors.torch import load_file, save_file

    from latentdiff.models.weights_file import read_safetensors

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=generator),
        "f16": torch.randn(7, generator=generator).half(),
        "bf16": torch.randn(2, 2, 2, generator=generator).bfloat16(),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "steps": torch.arange(6, dtype=torch.int64),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    expected = load_file(str(path))
    for dtype in (None, torch.float32, torch.bfloat16):  # mapped, mapped or read, read and cast
        read = read_safetensors(path, dtype)
        assert read.keys() == expected.keys()
        for name, tensor in expected.items():
            want = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            assert read[name].dtype == want.dtype and torch.equal(read[name], want), (name, dtype)


def test_pickle_weights_need_explicit_trust(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(tiny.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        ConditionalUNet.from_pretrained(tmp_path)
    loaded = ConditionalUNet.from_pretrained(tmp_path, allow_pickle=True)
    sample, timesteps, context = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(sample, timesteps, context), tiny(sample, timesteps, context))


def test_sharded_and_variant_weights_load(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "tiny")
    reference = UNet2DConditionModel.from_pretrained(tmp_path / "tiny")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    reference.save_pretrained(tmp_path / "variant", variant="fp16")
    sample, timesteps, context = inputs()
    with torch.no_grad():
        expected = tiny(sample, timesteps, context)
        for loaded in (
            ConditionalUNet.from_pretrained(tmp_path / "sharded"),
            ConditionalUNet.from_pretrained(tmp_path / "variant", variant="fp16"),
        ):
            assert torch.equal(loaded(sample, timesteps, context), expected)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type"),
        ({"time_cond_proj_dim": 256}, "time_cond_proj_dim"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"only_cross_attention": True}, "only_cross_attention"),
        ({"down_block_types": ["AttnDownBlock2D", "DownBlock2D"]}, "AttnDownBlock2D"),
        ({"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}, "mirror"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid_block_type"),
        ({"some_future_option": 3}, "some_future_option"),
    ],
)
def test_unsupported_diffusers_configs_are_refused_by_name(change, named):
    config = {**{k: list(v) if isinstance(v, tuple) else v for k, v in SD1_STYLE.items()}, **change}
    with pytest.raises(ValueError, match=named):
        UNetConfig.from_diffusers(config)


def test_neutral_values_of_unsupported_features_are_accepted():
    config = UNetConfig.from_diffusers(
        {**SD1_STYLE, "class_embed_type": None, "only_cross_attention": [False, False]}
    )
    assert config == UNetConfig.from_diffusers(SD1_STYLE)


# ---- bad input ----


@pytest.mark.parametrize(
    "sample_shape, timestep, context_shape, message",
    [
        ((2, 3, 16, 16), 10, (2, 7, TEXT_DIM), r"\(2, 3, 16, 16\).*\(B, 4, H, W\)"),
        ((2, 4, 16, 15), 10, (2, 7, TEXT_DIM), r"16x15.*downsample_factor=2"),
        ((2, 4, 16, 16), 10, (2, 7, TEXT_DIM + 1), rf"\(2, 7, {TEXT_DIM + 1}\).*\(B, L, {TEXT_DIM}\)"),
        ((2, 4, 16, 16), 10, (3, 7, TEXT_DIM), r"batch 3.*batch 2"),
        ((2, 4, 16, 16), torch.tensor([1, 2, 3]), (2, 7, TEXT_DIM), r"timestep has shape \(3,\).*\(2,\)"),
    ],
    ids=["channels", "spatial", "text_width", "text_batch", "timestep_batch"],
)
def test_bad_input_is_refused_naming_the_shapes(tiny, sample_shape, timestep, context_shape, message):
    with pytest.raises(ValueError, match=message):
        tiny(torch.randn(sample_shape), timestep, torch.randn(context_shape))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNetConfig(block_out_channels=(30, 60), attention_levels=(True, False), norm_num_groups=8)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(block_out_channels=(32, 64), attention_levels=(True,))


# ---- position embedding (a latentdiff extension, off in Stable Diffusion layouts) ----


def test_position_embedding_is_a_fixed_sincos_code_of_each_pixel():
    from latentdiff.models.attention import sincos_position_embedding

    emb = sincos_position_embedding(4, 6, 16)
    assert emb.shape == (1, 24, 16)
    assert len({tuple(row.tolist()) for row in emb[0]}) == 24  # every pixel has its own code
    grid = emb[0].reshape(4, 6, 16)
    assert torch.equal(grid[:, 0, :8], grid[:, 5, :8]) and torch.equal(
        grid[0, :, 8:], grid[3, :, 8:]
    )  # rows, cols
    # a pixel's code depends on where it lies in the image, not on the resolution: pixel (0, 0) of a 2x2 map and
    # pixel (1, 1) of a 6x6 map both centre at a quarter of the side
    assert torch.allclose(
        sincos_position_embedding(2, 2, 16)[0, 0], sincos_position_embedding(6, 6, 16)[0, 7]
    )
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_position_embedding(2, 2, 6)


def test_position_embedding_round_trips_and_changes_only_the_forward(tmp_path, tiny):
    config = dataclasses.replace(TINY, position_embedding=True)
    with_position = ConditionalUNet(config).eval()
    with_position.load_state_dict(tiny.state_dict())  # no extra weights
    assert "latentdiff_position_embedding" not in TINY.to_diffusers()  # SD layouts are written as before
    with_position.save_pretrained(tmp_path / "model")
    loaded = ConditionalUNet.from_pretrained(tmp_path, subfolder="model")
    assert loaded.config.position_embedding
    sample, timesteps, context = inputs()
    with torch.no_grad():
        out = with_position(sample, timesteps, context)
        assert torch.equal(loaded(sample, timesteps, context), out)
        assert not torch.allclose(out, tiny(sample, timesteps, context))
