"""LoRA adapters on the UNet (and the CLIP text encoder) through `peft`: add, load, weight, fuse, remove.

Hu et al. 2021, "LoRA: Low-rank adaptation of large language models", sec. 4.1, eq. 3. A frozen layer W₀ gets a
trainable update of rank r; a pipeline may hold several adapters i, each with a user weight s_i:

    h = W₀ x + Σ_i s_i · (α_i / r_i) · B_i A_i x

| code name         | symbol | meaning                                                                          |
|-------------------|--------|----------------------------------------------------------------------------------|
| `base_layer`      | W₀     | the frozen `nn.Linear` (d_out × d_in) or `nn.Conv2d` that the adapter wraps      |
| `lora_A`          | A      | (r, d_in) down-projection; Kaiming-uniform at creation                           |
| `lora_B`          | B      | (d_out, r) up-projection; zero at creation, so a fresh adapter changes nothing   |
| `rank`            | r      | rank of the update                                                               |
| `alpha`           | α      | the update is scaled by α / r (α = r: scale 1, diffusers' and peft's default)    |
| `weight`, `scale` | s      | the user's multiplier at inference (0: the base model; 1: as trained)             |

For a convolution, A is a convolution with W₀'s kernel, stride and padding and r output channels, and B a 1×1
convolution: the same update, made at every pixel. The layers are peft's (`peft.tuners.lora.LoraLayer`); this module
chooses the targets and keeps the trainable A and B in float32 whatever the base model's dtype (so mixed-precision
training unscales float32 gradients).

Targets are module names or name suffixes, as in `peft.LoraConfig(target_modules=...)`: `to_q` wraps every
`...attn1.to_q` and `...attn2.to_q`. Group names expand to lists: `attention` (the default), `feed_forward`,
`convolutions`; `TEXT_ENCODER_TARGETS` are the CLIP text encoder's attention projections.

The adapter files (diffusers', peft's, kohya's formats) are read and written by `latentdiff.lora.formats`.
"""

from __future__ import annotations

import collections
import difflib
import logging
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # W_Q, W_K, W_V, W_O of self- and cross-attention
FEED_FORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")  # the GEGLU input projection and the output Linear
CONV_TARGETS = (
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
)  # ResBlocks, samplers
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP text encoder attention
TARGET_GROUPS = {
    "attention": ATTENTION_TARGETS,
    "feed_forward": FEED_FORWARD_TARGETS,
    "convolutions": CONV_TARGETS,
}
_TEXT_MODEL_PREFIX = "text_model."  # CLIPTextModel's inner module in transformers 4.x (flattened away in 5.x)


# ---- what to adapt -----------------------------------------------------------------------------------------------


def expand_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Target module names with the group names (`attention`, `feed_forward`, `convolutions`) expanded, in order,
    without repeats."""
    names = [targets] if isinstance(targets, str) else list(targets)
    expanded: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"target_modules has {name!r}; each target must be a module name such as 'to_q'."
            )
        for target in TARGET_GROUPS.get(name, (name,)):
            if target not in expanded:
                expanded.append(target)
    if not expanded:
        raise ValueError(
            f"target_modules={targets!r} is empty; give at least one, e.g. {list(ATTENTION_TARGETS)}."
        )
    return tuple(expanded)


@dataclass(frozen=True)
class LoraSpec:
    """A new adapter's shape: rank r, scale α / r, dropout and the layers it wraps.

    Args:
        rank: r, an int >= 1 (4 to 64 are usual).
        alpha: α; None means α = r (update scale 1).
        dropout: dropout probability on the adapter's input, training only; in [0, 1).
        target_modules: module names or suffixes (`to_q`, `attn2.to_k`, `ff.net.2`) or group names (see
            `TARGET_GROUPS`); stored expanded.
    """

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be an int >= 1 (the LoRA rank r, e.g. 4 or 8).")
        if self.alpha is not None and (
            isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0
        ):
            raise ValueError(f"alpha={self.alpha!r} must be a positive number (or None for alpha = rank).")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0 <= self.dropout < 1
        ):
            raise ValueError(f"dropout={self.dropout!r} must be a number in [0, 1) (0: no dropout).")
        object.__setattr__(self, "target_modules", expand_targets(self.target_modules))

    @property
    def lora_alpha(self) -> float:
        """α, with the default α = r filled in."""
        return float(self.rank if self.alpha is None else self.alpha)

    def to_peft_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `peft.LoraConfig` (also the file metadata, in diffusers' key names)."""
        return {
            "r": self.rank,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": float(self.dropout),
            "target_modules": list(self.target_modules),
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_rslora": False,
        }


def _adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's `nn.Linear` / `nn.Conv2d` layers by name; a layer already wrapped by peft counts once, under the
    wrapper's name."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            layers[name] = module.get_base_layer()
        elif (
            isinstance(module, nn.Linear | nn.Conv2d)
            and ".lora_" not in name
            and not name.endswith("base_layer")
        ):
            layers[name] = module
    return layers


def _matches(name: str, target: str) -> bool:
    """peft's rule for a `target_modules` list entry: the module's name is the target or ends with '.' + target."""
    return name == target or name.endswith("." + target)


def _short_name(name: str) -> str:
    """The name a target list uses for a layer: its last part, or the last two when the last is an index."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def check_targets(
    model: nn.Module, targets: str | Iterable[str], model_name: str = "UNet"
) -> dict[str, list[str]]:
    """The layers each target wraps; a ValueError naming a target that wraps none, with the names that would.

    Args:
        model: the module to adapt.
        targets: names, suffixes or group names (see `expand_targets`).
        model_name: how messages call the model ("UNet", "text encoder").
    Returns:
        target -> the full names of the `nn.Linear` / `nn.Conv2d` layers it matches.
    """
    layers = _adaptable_layers(model)
    found = {}
    for target in expand_targets(targets):
        matched = [name for name in layers if _matches(name, target)]
        if matched:
            found[target] = matched
            continue
        others = [(name, m) for name, m in model.named_modules() if name and _matches(name, target)]
        valid = sorted({_short_name(name) for name in layers})
        if others:
            name, module = others[0]
            inner = sorted(n for n in layers if n.startswith(name + "."))
            example = f" (e.g. {_short_name(inner[0])!r})" if inner else ""
            raise ValueError(
                f"target module {target!r} names {type(module).__name__} layers of the {model_name} (such as "
                f"{name!r}), which LoRA cannot wrap: name nn.Linear or nn.Conv2d layers inside them{example}."
            )
        close = difflib.get_close_matches(target, valid + list(TARGET_GROUPS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"target module {target!r} matches no nn.Linear or nn.Conv2d layer of the {model_name}.{hint} Its layer "
            f"names are {valid}, and the groups {list(TARGET_GROUPS)} expand to lists of them."
        )
    return found


# ---- adapters on a module ------------------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> dict[str, Any]:
    """The peft LoRA layers of `model` by module name (empty when it has no adapter)."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in `model`, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters `model` applies (empty without adapters)."""
    layers = list(lora_layers(model).values())
    return list(layers[0].active_adapters) if layers else []


def adapter_weights(model: nn.Module) -> dict[str, float]:
    """s of every adapter in `model` (its layers' scaling divided by α / r)."""
    weights = {}
    for layer in lora_layers(model).values():
        for name in layer.lora_A.keys():
            if name not in weights:
                weights[name] = layer.scaling[name] / (layer.lora_alpha[name] / layer.r[name])
    return weights


def is_fused(model: nn.Module) -> bool:
    """Whether some adapter is merged into `model`'s base weights."""
    return any(layer.merged for layer in lora_layers(model).values())


def is_enabled(model: nn.Module) -> bool:
    """Whether the adapters of `model` are applied (False after `enable_adapters(model, False)`)."""
    return not any(layer.disable_adapters for layer in lora_layers(model).values())


def _inject(model: nn.Module, config: Any, adapter_name: str) -> None:
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():
        # peft warns whenever a model that already holds an adapter receives another: that is the intent here.
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)


def _check_new_name(model: nn.Module, adapter_name: str) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r} must be a non-empty string without dots.")
    if adapter_name in adapter_names(model):
        raise ValueError(
            f"adapter_name={adapter_name!r} is already in the model (it has {adapter_names(model)}); choose another."
        )
    if is_fused(model):
        raise ValueError("the model has fused adapters: unfuse them (unfuse_lora()) before adding another.")


def add_lora(
    model: nn.Module, spec: LoraSpec, adapter_name: str = "default", generator: torch.Generator | None = None
) -> list[nn.Parameter]:
    """Wrap the layers `spec` targets with a fresh, trainable adapter: the model computes exactly what it did, and
    only the adapter's parameters require gradients afterwards.

    Args:
        model: the UNet or text encoder, changed in place (its class stays the same; the wrapped layers' weights
            move to `<layer>.base_layer.weight`).
        spec: rank, α, dropout and targets.
        adapter_name: the adapter's name in the model.
        generator: draws A (Kaiming-uniform, peft's initialisation) reproducibly; None uses torch's global RNG.
    Returns:
        The adapter's parameters (A and B of every wrapped layer), float32, on the model's device; the new adapter
        is the model's only active one.
    """
    from peft import LoraConfig

    _check_new_name(model, adapter_name)
    check_targets(model, spec.target_modules, type(model).__name__)
    _inject(model, LoraConfig(**spec.to_peft_kwargs()), adapter_name)
    model.requires_grad_(False)
    parameters = []
    for layer in lora_layers(model).values():
        if adapter_name not in layer.lora_A:
            continue
        down, up = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        down.float()  # float32 whatever W₀'s dtype: mixed precision unscales float32 gradients only
        up.float()
        if generator is not None:
            initial = torch.empty(down.weight.shape)
            nn.init.kaiming_uniform_(initial, a=math.sqrt(5), generator=generator)  # peft's init of A, seeded
            with torch.no_grad():
                down.weight.copy_(initial)
        for parameter in (*down.parameters(), *up.parameters()):
            parameter.requires_grad_(True)
            parameters.append(parameter)
    return parameters


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Parameter]:
    """The parameters of one adapter (or of all adapters) by their name in `model`."""
    names = adapter_names(model) if adapter_name is None else [adapter_name]
    return {
        name: p
        for name, p in model.named_parameters()
        if any(f".lora_A.{a}." in name or f".lora_B.{a}." in name for a in names)
    }


def _freeze(layer: nn.Module) -> None:
    for name, parameter in layer.named_parameters():
        if ".lora_" in f".{name}":
            parameter.requires_grad_(False)


def set_active_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float]) -> None:
    """Apply exactly the adapters `names` with weights s (the others stay loaded, unused); adapters are frozen.

    A layer without one of the adapters just skips it."""
    for layer in lora_layers(model).values():
        layer.set_adapter(list(names))
        _freeze(layer)
        for name, weight in zip(names, weights):
            layer.set_scale(name, float(weight))


@contextmanager
def scaled_adapters(model: nn.Module, scale: float) -> Iterator[None]:
    """Every active adapter's update multiplied by `scale` inside the block, its weights exactly as before after
    it (diffusers' `cross_attention_kwargs={"scale": s}`). Fused adapters are in the base weights: unchanged."""
    layers = list(lora_layers(model).values())
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        layer.scale_layer(scale)
    try:
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.update(scaling)


def fuse_adapters(model: nn.Module) -> None:
    """W₀ ← W₀ + Σ s_i (α_i / r_i) B_i A_i over the active adapters: no extra cost per step afterwards."""
    for layer in lora_layers(model).values():
        if not layer.merged and not layer.disable_adapters:
            layer.merge()


def unfuse_adapters(model: nn.Module) -> None:
    """Subtract what `fuse_adapters` added (W₀ comes back up to float rounding)."""
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.unmerge()


def enable_adapters(model: nn.Module, enabled: bool) -> None:
    """Apply (True) or skip (False) every adapter without unloading it; adapters stay frozen."""
    for layer in lora_layers(model).values():
        layer.enable_adapters(enabled)
        _freeze(layer)  # peft makes the active adapters trainable again when it enables them


def remove_adapters(model: nn.Module) -> None:
    """Put every wrapped layer's base layer back in its place and forget the adapters.

    Unfused, the model is again the very module it was (same parameters, same values). Fused adapters stay in the
    weights (diffusers' `fuse_lora` then `unload_lora_weights` bakes an adapter in the same way).
    """
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def adapter_config(model: nn.Module, adapter_name: str = "default") -> dict[str, Any]:
    """The `peft.LoraConfig` keywords of one adapter in `model` (diffusers' metadata keys)."""
    configs = getattr(model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter {adapter_name!r}; it has {adapter_names(model)}.")
    config = configs[adapter_name]
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules)
        if not isinstance(config.target_modules, str)
        else config.target_modules,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "use_rslora": bool(config.use_rslora),
    }


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """One adapter's A and B as `<module>.lora_A.weight` / `<module>.lora_B.weight`, float32 on the CPU."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        if adapter_name in layer.lora_A:
            tensors[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            tensors[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
    if not tensors:
        raise ValueError(f"the model has no adapter {adapter_name!r}; it has {adapter_names(model)}.")
    return {key: t.detach().to("cpu", torch.float32).contiguous() for key, t in tensors.items()}


@dataclass
class LoraWeights:
    """One model's adapter as read from a file, before it is matched to a model.

    lora_A / lora_B: module name -> A (r, d_in) or (r, C_in, kh, kw), B (d_out, r) or (C_out, r, 1, 1).
    alpha: module name -> α for the modules whose file says so; the others take `default_alpha` or r.
    flat_names: kohya's files write module names with '_' for '.'; they are matched against the model on load.
    """

    lora_A: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_B: dict[str, torch.Tensor] = field(default_factory=dict)
    alpha: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] | None = None  # the file's LoraConfig keywords for this part, if it has them
    flat_names: bool = False

    def alpha_of(self, module: str) -> float:
        """α of one module: the file's per-module value, else its config (alpha_pattern, lora_alpha, rsLoRA),
        else r (scale 1)."""
        rank = self.lora_A[module].shape[0]
        if module in self.alpha:
            return self.alpha[module]
        if not self.config or self.config.get("lora_alpha") is None:
            return float(rank)
        alpha = float(self.config["lora_alpha"])
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):  # peft's pattern rule
                alpha = float(value)
                break
        if self.config.get("use_rslora"):
            alpha *= math.sqrt(rank)  # rsLoRA scales by α/√r, which is (α√r)/r
        return alpha


def _resolve_names(weights: LoraWeights, model: nn.Module, model_name: str) -> dict[str, str]:
    """File module name -> the name `model` spells it with (kohya's flat names; CLIP's `text_model.` prefix)."""
    layers = _adaptable_layers(model)
    lookup = {name.replace(".", "_") if weights.flat_names else name: name for name in layers}
    prefix = _TEXT_MODEL_PREFIX.replace(".", "_") if weights.flat_names else _TEXT_MODEL_PREFIX

    def resolve(module: str) -> str:
        for candidate in (module, module.removeprefix(prefix), prefix + module):
            if candidate in lookup:
                return lookup[candidate]
        raise ValueError(
            f"the adapter has a layer {module!r} that the {model_name} does not have (its layers are named like "
            f"{sorted(layers)[:2]}): this adapter was made for another model."
        )

    return {module: resolve(module) for module in weights.lora_A}


def _fit(
    layer: nn.Module, name: str, down: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B reshaped for `layer` (a 1×1 conv and a Linear share their 2-D weights), or a ValueError naming the
    layer and both shapes."""
    if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and down.ndim == 2 and up.ndim == 2:
        down, up = down[:, :, None, None], up[:, :, None, None]
    elif (
        isinstance(layer, nn.Linear)
        and down.ndim == 4
        and down.shape[2:] == (1, 1)
        and up.shape[2:] == (1, 1)
    ):
        down, up = down[:, :, 0, 0], up[:, :, 0, 0]
    rank = down.shape[0]
    if isinstance(layer, nn.Linear):
        expected_down, expected_up = (rank, layer.in_features), (layer.out_features, rank)
    else:
        expected_down = (rank, layer.in_channels // layer.groups, *layer.kernel_size)
        expected_up = (layer.out_channels, rank, 1, 1)
    if tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
        raise ValueError(
            f"the adapter does not fit layer {name!r} ({layer}): its lora_A has shape {tuple(down.shape)} and "
            f"lora_B {tuple(up.shape)}, but that layer needs {expected_down} and {expected_up}. The adapter was "
            "made for a model of other shapes."
        )
    return down, up


def fit_lora(model: nn.Module, weights: LoraWeights, model_name: str = "UNet") -> LoraWeights:
    """The adapter matched to `model`: module names as the model spells them, A and B shaped for each layer, every
    α explicit. Raises a ValueError naming the first layer the model lacks or whose shape differs; `model` is not
    changed."""
    names = _resolve_names(weights, model, model_name)
    layers = _adaptable_layers(model)
    fitted = LoraWeights(config=weights.config)
    for module, name in names.items():
        down, up = _fit(layers[name], name, weights.lora_A[module], weights.lora_B[module])
        fitted.lora_A[name], fitted.lora_B[name] = down, up
        fitted.alpha[name] = weights.alpha_of(module)
    return fitted


def load_lora(model: nn.Module, weights: LoraWeights, adapter_name: str, model_name: str = "UNet") -> None:
    """Add an adapter read by `read_lora_file` to `model` under `adapter_name`, frozen, in float32.

    Every layer is checked (`fit_lora`) before the model is touched: a mismatch raises a ValueError naming the layer
    and leaves the model as it was. Afterwards the new adapter is the model's only active one
    (`set_active_adapters` changes that).
    """
    from peft import LoraConfig

    _check_new_name(model, adapter_name)
    weights = fit_lora(model, weights, model_name)
    ranks = {name: down.shape[0] for name, down in weights.lora_A.items()}
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(weights.alpha.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(ranks),
        # exact names (escaped: peft reads pattern keys as regular expressions)
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(n): a for n, a in weights.alpha.items() if a != alpha},
    )
    _inject(model, config, adapter_name)
    wrapped = lora_layers(model)
    with torch.no_grad():
        for name in ranks:
            layer = wrapped[name]
            for module, tensor in (
                (layer.lora_A[adapter_name], weights.lora_A[name]),
                (layer.lora_B[adapter_name], weights.lora_B[name]),
            ):
                module.float()
                module.weight.copy_(tensor.to(torch.float32))
                module.weight.requires_grad_(False)
