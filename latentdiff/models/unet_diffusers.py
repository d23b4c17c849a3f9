"""The bridge between this project's `ConditionalUNet` / `ControlNetModel` and diffusers' `UNet2DConditionModel` /
`ControlNetModel` files: their `config.json` (read and written, with what these models cannot express refused by
name) and the folder of weights (safetensors, sharded, or a trusted pickle; variants such as `fp16`).

The parameter names need no translation: `ConditionalUNet` keeps diffusers' (see `latentdiff.models.unet`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from latentdiff.models.unet import ConditionalUNet, UNetConfig
from latentdiff.models.weights_file import read_safetensors
from latentdiff.validation import check_safetensors_file, read_json_file

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_WEIGHTS_NAMES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.ckpt")


def config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """The `config.json` dict of the equivalent diffusers `UNet2DConditionModel`.

    diffusers' quirk, kept so that its loader reads this file: the head COUNT is stored under
    `attention_head_dim` (diffusers issue #2011; `UNet2DConditionModel` reads `num_attention_heads or
    attention_head_dim` as the number of heads and refuses `num_attention_heads`).
    """

    def as_json(value: int | tuple[int, ...]) -> int | list[int]:
        return value if isinstance(value, int) else list(value)

    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels)]
    try:
        diffusers_version = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        diffusers_version = "0.30.0"
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": diffusers_version,
        "sample_size": config.sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": config.flip_sin_to_cos,
        "freq_shift": config.freq_shift,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn" if config.mid_block_attention else "UNetMidBlock2D",
        "up_block_types": up,
        "only_cross_attention": False,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": as_json(config.layers_per_block),
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": config.dropout,
        "act_fn": "silu",
        "norm_num_groups": config.norm_num_groups,
        "norm_eps": config.norm_eps,
        "cross_attention_dim": config.cross_attention_dim,
        "transformer_layers_per_block": as_json(config.transformer_layers_per_block),
        "attention_head_dim": as_json(config.num_attention_heads),  # the head count: see the docstring
        "use_linear_projection": config.use_linear_projection,
        "upcast_attention": config.upcast_attention,
        # not a diffusers key: diffusers' UNet2DConditionModel ignores it (and then lacks the embedding)
        **({POSITION_EMBEDDING_KEY: True} if config.position_embedding else {}),
    }


def config_from_diffusers(config: dict[str, Any]) -> UNetConfig:
    """Read a diffusers `UNet2DConditionModel` config dict; refuse what this UNet cannot express.

    A missing key takes diffusers' default. Keys that only select features this UNet does not have are
    accepted at their neutral value and refused otherwise, with a message naming the key and value.
    """
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise ValueError(
            f"_class_name={class_name!r} is not supported: only UNet2DConditionModel configs load"
        )
    for key, value in config.items():
        if key.startswith("_") or key in _DIFFUSERS_DEFAULTS or key in _DIFFUSERS_IGNORED:
            continue
        if key == POSITION_EMBEDDING_KEY and isinstance(value, bool):
            continue
        if key in _DIFFUSERS_NEUTRAL:
            allowed = _DIFFUSERS_NEUTRAL[key]
            neutral = value in allowed or (isinstance(value, list) and all(v in allowed for v in value))
            if not neutral:
                raise ValueError(
                    f"unsupported UNet config: {key}={value!r}; this UNet supports only {key} in "
                    f"{list(allowed)!r} (Stable Diffusion 1.x/2.x layouts)"
                )
        elif value is not None:
            raise ValueError(f"unsupported UNet config: unknown key {key}={value!r}")
    c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}
    levels = len(c["block_out_channels"])

    down, up, mid = list(c["down_block_types"]), list(c["up_block_types"]), c["mid_block_type"]
    block_lists = (("down_block_types", down, _DOWN_BLOCKS), ("up_block_types", up, _UP_BLOCKS))
    for key, blocks, known in block_lists:
        unknown = [b for b in blocks if b not in known]
        if unknown or len(blocks) != levels:
            raise ValueError(
                f"unsupported UNet config: {key}={blocks!r}; need {levels} entries (one per "
                f"block_out_channels) from {sorted(known)!r}"
            )
    attention_levels = tuple(_DOWN_BLOCKS[b] for b in down)
    if tuple(_UP_BLOCKS[b] for b in reversed(up)) != attention_levels:
        raise ValueError(
            f"unsupported UNet config: up_block_types={up!r} do not mirror down_block_types={down!r} "
            f"(attention on the same levels both ways)"
        )
    if mid not in _MID_BLOCKS:
        raise ValueError(
            f"unsupported UNet config: mid_block_type={mid!r}; supported: {sorted(_MID_BLOCKS)!r}"
        )

    sample_size = c["sample_size"]
    if isinstance(sample_size, list | tuple):
        if len(set(sample_size)) != 1:
            raise ValueError(f"unsupported UNet config: non-square sample_size={sample_size!r}")
        sample_size = sample_size[0]
    cross = c["cross_attention_dim"]
    if isinstance(cross, list | tuple):
        if len(set(cross)) != 1:
            raise ValueError(f"unsupported UNet config: per-level cross_attention_dim={cross!r}")
        cross = cross[0]
    t_layers = c["transformer_layers_per_block"]
    if not isinstance(t_layers, int) and any(isinstance(v, list | tuple) for v in t_layers):
        raise ValueError(f"unsupported UNet config: nested transformer_layers_per_block={t_layers!r}")
    # diffusers' quirk: `attention_head_dim` is the head count unless `num_attention_heads` is given.
    heads = c["num_attention_heads"] if c["num_attention_heads"] is not None else c["attention_head_dim"]
    if c["norm_num_groups"] is None:
        raise ValueError("unsupported UNet config: norm_num_groups=None (no output norm)")

    def as_field(value: Any) -> Any:
        return tuple(value) if isinstance(value, list | tuple) else value

    return UNetConfig(
        sample_size=sample_size,
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        block_out_channels=tuple(c["block_out_channels"]),
        attention_levels=attention_levels,
        mid_block_attention=_MID_BLOCKS[mid],
        layers_per_block=as_field(c["layers_per_block"]),
        transformer_layers_per_block=as_field(t_layers),
        num_attention_heads=as_field(heads),
        cross_attention_dim=cross,
        use_linear_projection=c["use_linear_projection"],
        upcast_attention=c["upcast_attention"],
        norm_num_groups=c["norm_num_groups"],
        norm_eps=c["norm_eps"],
        flip_sin_to_cos=c["flip_sin_to_cos"],
        freq_shift=c["freq_shift"],
        dropout=c["dropout"],
        position_embedding=config.get(POSITION_EMBEDDING_KEY, False),
    )


_DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attention
_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_BLOCKS = {"UNetMidBlock2DCrossAttn": True, "UNetMidBlock2D": False}
# diffusers' keys this config maps, with diffusers' defaults (used when a key is missing from config.json).
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "upcast_attention": False,
}
# diffusers' keys for features this UNet does not have: the values that leave them off.
_DIFFUSERS_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "act_fn": ("silu", "swish"),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
POSITION_EMBEDDING_KEY = "latentdiff_position_embedding"  # config.json key of UNetConfig.position_embedding
_DIFFUSERS_IGNORED = {"addition_embed_type_num_heads"}  # no effect while addition_embed_type is None


# ---- ControlNetModel's config.json: the UNet's encoder keys plus the condition embedding's ----------------------

_CONTROLNET_KEYS = {  # diffusers' key -> ControlNetConfig field
    "conditioning_channels": "conditioning_channels",
    "conditioning_embedding_out_channels": "conditioning_embedding_out_channels",
    "controlnet_conditioning_channel_order": "conditioning_channel_order",
}
# UNet2DConditionModel keys that diffusers' ControlNetModel does not take (it has no up path and no dropout)
_NOT_CONTROLNET_KEYS = ("sample_size", "out_channels", "up_block_types", "center_input_sample", "dropout")


def controlnet_config_to_diffusers(config: Any) -> dict[str, Any]:
    """The `config.json` dict of the equivalent diffusers `ControlNetModel` (a `ControlNetConfig` in)."""
    unet = {k: v for k, v in config_to_diffusers(config).items() if k not in _NOT_CONTROLNET_KEYS}
    extra = {key: getattr(config, field) for key, field in _CONTROLNET_KEYS.items()}
    extra["conditioning_embedding_out_channels"] = list(config.conditioning_embedding_out_channels)
    return {**unet, "_class_name": "ControlNetModel", **extra, "global_pool_conditions": False}


def controlnet_config_from_diffusers(config: dict[str, Any]) -> Any:
    """Read a diffusers `ControlNetModel` config dict as a `ControlNetConfig`: the UNet keys through
    `config_from_diffusers` (the up path taken as the mirror of the down path), the condition embedding's here."""
    from latentdiff.models.controlnet import ControlNetConfig

    class_name = config.get("_class_name", "ControlNetModel")
    if class_name != "ControlNetModel":
        raise ValueError(f"_class_name={class_name!r} is not supported: only ControlNetModel configs load")
    if config.get("global_pool_conditions", False):
        raise ValueError("unsupported ControlNet config: global_pool_conditions=True (shuffle ControlNets)")
    unet = {k: v for k, v in config.items() if k not in _CONTROLNET_KEYS and k != "global_pool_conditions"}
    down = unet.get("down_block_types", _DIFFUSERS_DEFAULTS["down_block_types"])
    mirror = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    unet["up_block_types"] = [mirror.get(block, block) for block in reversed(down)]
    unet["_class_name"] = "UNet2DConditionModel"
    fields = dataclasses.asdict(config_from_diffusers(unet))
    fields.update({f: config[k] for k, f in _CONTROLNET_KEYS.items() if k in config})
    return ControlNetConfig(**fields)


# ---- folders ------------------------------------------------------------------------------------------------------


def save_model(model: nn.Module, save_directory: str | Path) -> None:
    """Write `config.json` (diffusers' format: `model.config.to_diffusers()`) and
    `diffusion_pytorch_model.safetensors` into a folder (a `ConditionalUNet` or a `ControlNetModel`)."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps(model.config.to_diffusers(), indent=2) + "\n")
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def _read_config(path: str | Path, subfolder: str | None, example: str) -> tuple[Path, dict[str, Any]]:
    directory = Path(path) / (subfolder or "")
    config_file = directory / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {directory}; pass the folder written by save_pretrained (or a "
            f"diffusers pipeline folder with subfolder='{example}')"
        )
    return directory, read_json_file(config_file)


def load_controlnet(
    pretrained_model_path: str | Path,
    subfolder: str | None = None,
    torch_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    variant: str | None = None,
) -> nn.Module:
    """Load a `ControlNetModel` folder written by its `save_pretrained` or by diffusers'
    `ControlNetModel.save_pretrained`; arguments as `load_unet`."""
    from latentdiff.models.controlnet import ControlNetModel

    directory, config = _read_config(pretrained_model_path, subfolder, "controlnet")
    config = controlnet_config_from_diffusers(config)
    return load_weights(config, directory, torch_dtype, allow_pickle, variant, model_class=ControlNetModel)


def load_unet(
    pretrained_model_path: str | Path,
    subfolder: str | None = None,
    torch_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    variant: str | None = None,
) -> ConditionalUNet:
    """Load a folder written by `save_pretrained` or by diffusers' `UNet2DConditionModel.save_pretrained`
    (e.g. the `unet/` folder of a Stable Diffusion repository in the diffusers layout).

    Args:
        pretrained_model_path: a local directory.
        subfolder: a folder inside it, e.g. "unet" for a pipeline folder.
        torch_dtype: dtype of the parameters; float32 when None (as in diffusers).
        allow_pickle: also read `diffusion_pytorch_model.bin`/`.ckpt` pickle files (with
            `torch.load(weights_only=True)`); only for files you trust. Safetensors are always preferred.
        variant: weights variant, e.g. "fp16" reads `diffusion_pytorch_model.fp16.safetensors`.
    Returns:
        The model in eval mode on the CPU.
    """
    directory, config = _read_config(pretrained_model_path, subfolder, "unet")
    return load_weights(config_from_diffusers(config), directory, torch_dtype, allow_pickle, variant)


def load_weights(
    config: UNetConfig,
    directory: Path,
    torch_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    variant: str | None = None,
    model_class: type[nn.Module] = ConditionalUNet,
) -> nn.Module:
    """A `model_class` (`ConditionalUNet` or `ControlNetModel`) of `config` (already read) with the weights of
    `directory`, in eval mode on the CPU."""
    dtype = torch_dtype or torch.float32
    state = _load_weights(directory, allow_pickle, variant, dtype)
    state = {
        name: tensor.to(dtype) for name, tensor in state.items()
    }  # a pickle's (safetensors: cast already)
    with torch.device("meta"):
        model = model_class(config)
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(
            f"weights in {directory} do not match its config: {len(missing)} missing "
            f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
        )
    expected = model.state_dict()
    wrong = [
        f"{n} {tuple(t.shape)} (config: {tuple(expected[n].shape)})"
        for n, t in state.items()
        if t.shape != expected[n].shape
    ]
    if wrong:
        raise ValueError(
            f"the weights in {directory} do not match its {CONFIG_NAME}: {len(wrong)} tensor(s) have another "
            f"shape, e.g. {wrong[:2]}; the weights were saved from another config: use that config.json"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _load_weights(
    directory: Path, allow_pickle: bool, variant: str | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The state dict in `directory`: one safetensors file, a sharded safetensors index (both read tensor by tensor
    into `dtype`, `latentdiff.models.weights_file`) or (if allowed) a pickle. A variant goes before the last
    suffix, as in `diffusion_pytorch_model.fp16.safetensors`."""

    def named(name: str) -> Path:
        stem, suffix = name.rsplit(".", 1)
        return directory / (f"{stem}.{variant}.{suffix}" if variant else name)

    single, index = named(WEIGHTS_NAME), named(WEIGHTS_NAME + ".index.json")
    if single.is_file():
        check_safetensors_file(single)
        return read_safetensors(single, dtype)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for shard in shards:
            check_safetensors_file(directory / shard)
        return {name: t for shard in shards for name, t in read_safetensors(directory / shard, dtype).items()}
    for pickle_file in (named(n) for n in PICKLE_WEIGHTS_NAMES):
        if pickle_file.is_file():
            if not allow_pickle:
                raise ValueError(
                    f"{pickle_file} is a pickle file, which can run code when loaded; convert it to "
                    f"safetensors, or pass allow_pickle=True if you trust it"
                )
            logger.info("loading pickle weights %s with torch.load(weights_only=True)", pickle_file)
            return torch.load(pickle_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {single.name} (or sharded index) in {directory}")
