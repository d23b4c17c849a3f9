"""LoRA adapter files: where an adapter is, what its keys mean, and writing one in the layout diffusers reads.

Files: diffusers' layout (the one `StableDiffusionPipeline.save_lora_weights` writes), so that diffusers loads this
project's adapters and this project loads diffusers':
- `pytorch_lora_weights.safetensors`: keys `unet.<module>.lora_A.weight` (A) and `unet.<module>.lora_B.weight` (B),
  and `text_encoder.text_model.<module>.lora_A.weight` ... for the text encoder; the LoRA config of each part in the
  safetensors metadata under `lora_adapter_metadata` as `{"unet.r": 4, "unet.lora_alpha": 4.0, ...}`;
- `lora_config.json` beside it: the same configs for people to read (and a fallback when the metadata is missing).
`read_lora_file` also reads: peft's `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`, for the
UNet); the older diffusers formats `<module>.lora.down.weight` / `.lora.up.weight` and
`<block>.processor.to_q_lora.down.weight`; and kohya's `lora_unet_<module_with_underscores>.lora_down.weight` with
its `.alpha` (module names are matched against the model, so its underscores are not guessed). A file without alphas
gets α = r (scale 1), as diffusers assumes. `save_lora(..., save_format="kohya")` writes kohya's keys (with every
module's `.alpha`), the layout the web UIs (AUTOMATIC1111, ComfyUI) load.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentdiff.lora.adapters import _TEXT_MODEL_PREFIX, LoraWeights, adapter_config, adapter_state_dict
from latentdiff.model_card import CARD_NAME, lora_card
from latentdiff.validation import check_safetensors_file

logger = logging.getLogger(__name__)


LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name
LORA_CONFIG_NAME = "lora_config.json"
PEFT_WEIGHTS_NAME = (
    "adapter_model.safetensors"  # peft's `PeftModel.save_pretrained` file name (UNet only here)
)
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key for the LoRA configs
COMPONENTS = ("unet", "text_encoder")  # the parts of a pipeline an adapter file may hold, by key prefix
SAVE_FORMATS = ("diffusers", "kohya")  # the key layouts save_lora writes


def _file_module_name(component: str, name: str, model: nn.Module) -> str:
    """The module name written to the file: CLIP's names get their long-standing `text_model.` prefix back when
    transformers has flattened it away, so every diffusers version reads the file."""
    if component == "text_encoder" and not hasattr(model, "text_model") and hasattr(model, "encoder"):
        return _TEXT_MODEL_PREFIX + name
    return name


def _module_alpha(config: dict[str, Any], module: str) -> float:
    """α of one adapted module: its `alpha_pattern` entry (a module name or a suffix of it), else `lora_alpha`."""
    for pattern, alpha in config["alpha_pattern"].items():
        if module == pattern or module.endswith("." + pattern):
            return float(alpha)
    return float(config["lora_alpha"])


def _kohya_tensors(
    component: str, model: nn.Module, state: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """One part's adapter in kohya's keys: `lora_unet_<module_with_underscores>.lora_down.weight` (A),
    `.lora_up.weight` (B) and `.alpha` (α, a 0-d tensor; the update is (α / r)·B·A)."""
    if config["use_rslora"]:
        raise ValueError(
            "an rsLoRA adapter (scale α/√r) has no kohya form (kohya scales by α/r): save it in diffusers' format."
        )
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component]
    tensors = {}
    for key, tensor in state.items():
        module, _, suffix = key.rpartition(".lora_")
        flat = prefix + _file_module_name(component, module, model).replace(".", "_")
        role = {"A.weight": "lora_down", "B.weight": "lora_up"}[suffix]
        tensors[f"{flat}.{role}.weight"] = tensor
        tensors[f"{flat}.alpha"] = torch.tensor(_module_alpha(config, module))
    return tensors


def save_lora(
    save_directory: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    adapter_name: str = "default",
    model_card: str | None = None,
    save_format: str = "diffusers",
) -> Path:
    """Write one adapter of the UNet and/or text encoder (see the module docstring), with a model card `README.md`
    (`model_card`, default `latentdiff.model_card.lora_card`).

    Args:
        save_format: "diffusers" (keys `unet.<module>.lora_A.weight`, configs in the metadata) or "kohya" (the
            web UI's and kohya's sd-scripts' keys `lora_unet_<module>.lora_down.weight` with `.alpha`, which
            AUTOMATIC1111/ComfyUI load; `read_lora_file` reads both).
    Returns:
        The path of `pytorch_lora_weights.safetensors`.
    """
    from safetensors.torch import save_file

    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format={save_format!r} is not one of {', '.join(SAVE_FORMATS)}.")
    parts = {
        name: model for name, model in (("unet", unet), ("text_encoder", text_encoder)) if model is not None
    }
    if not parts:
        raise ValueError(
            "save_lora got neither unet nor text_encoder: pass the model(s) holding the adapter."
        )
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, dict[str, Any]] = {}
    for component, model in parts.items():
        configs[component] = adapter_config(model, adapter_name)
        state = adapter_state_dict(model, adapter_name)
        if save_format == "kohya":
            tensors.update(_kohya_tensors(component, model, state, configs[component]))
            continue
        for key, tensor in state.items():
            module, _, suffix = key.rpartition(".lora_")
            tensors[f"{component}.{_file_module_name(component, module, model)}.lora_{suffix}"] = tensor
    packed = {
        f"{component}.{key}": value for component, config in configs.items() for key, value in config.items()
    }
    if save_format == "kohya":  # what kohya's sd-scripts write (rank and alpha of the UNet's adapter)
        first = next(iter(configs.values()))
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(first["r"]),
            "ss_network_alpha": str(first["lora_alpha"]),
        }
    else:
        metadata = {METADATA_KEY: json.dumps(packed, sort_keys=True)}
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LORA_WEIGHTS_NAME
    partial = directory / (LORA_WEIGHTS_NAME + ".partial")
    save_file(tensors, str(partial), metadata={"format": "pt", **metadata})
    os.replace(partial, path)  # never a half-written adapter under the real name
    (directory / LORA_CONFIG_NAME).write_text(
        json.dumps({"weights": LORA_WEIGHTS_NAME, "format": save_format, **configs}, indent=2) + "\n"
    )
    (directory / CARD_NAME).write_text(model_card or lora_card(directory))
    return path


# key patterns, tried in order: (regex, role of the tensor); `module` is the adapted layer's name
_KEY_FORMATS = (
    (
        re.compile(r"(?P<module>.+)\.lora_(?P<role>A|B)(?:\.[^.]+)?\.weight"),
        "peft",
    ),  # also .lora_A.<adapter>.weight
    (re.compile(r"(?P<module>.+)\.lora\.(?P<role>down|up)\.weight"), "diffusers_old"),
    (
        re.compile(
            r"(?P<module>.+?)\.(?:processor\.)?(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight"
        ),
        "attn_processor",
    ),
    (re.compile(r"(?P<module>.+)\.lora_(?P<role>down|up)\.weight"), "kohya"),
    (re.compile(r"(?P<module>.+)\.alpha"), "alpha"),
)
_ATTN_PROCESSOR_NAMES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}


def find_lora_file(path: str | os.PathLike) -> Path:
    """The weights file of `path`: the file itself, or in a folder `pytorch_lora_weights.safetensors`, else
    `adapter_model.safetensors`, else its only `.safetensors` file. FileNotFoundError says what was looked for."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(
                f"{path} is not a .safetensors file; pickled LoRA files (.bin, .pt, .ckpt) can run code when "
                "loaded and are not read: convert it to safetensors."
            )
        return path
    if not path.is_dir():
        raise FileNotFoundError(
            f"no LoRA adapter at {str(path)!r}: pass a folder holding {LORA_WEIGHTS_NAME} (what train_lora.py and "
            "diffusers write) or the path of a .safetensors file."
        )
    for name in (LORA_WEIGHTS_NAME, PEFT_WEIGHTS_NAME):
        if (path / name).is_file():
            return path / name
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(
        f"no LoRA weights in the folder {str(path)!r}: expected {LORA_WEIGHTS_NAME}"
        + (
            f"; it holds several .safetensors files ({[c.name for c in candidates]}), pass one of them"
            if candidates
            else "; it holds no .safetensors file"
        )
    )


def _split_component(key: str) -> tuple[str, str, bool]:
    """(component, rest of the key, names are flat) of a file key."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            return component, key[len(prefix) :], True
    if key.startswith(("text_encoder_2.", "lora_te2_")):
        raise ValueError(
            f"{key!r} belongs to a second text encoder (an SDXL LoRA); only SD 1.x/2.x adapters load."
        )
    for component in COMPONENTS:
        if key.startswith(component + "."):
            return component, key[len(component) + 1 :], False
    return "unet", key.removeprefix("base_model.model."), False  # peft's adapter_model.safetensors of a UNet


def _parse_key(rest: str) -> tuple[str, re.Match] | None:
    """(format, match) of a key without its component prefix; None when no format knows it."""
    for pattern, kind in _KEY_FORMATS:
        match = pattern.fullmatch(rest)
        if match:
            return kind, match
    return None


def _read_configs(file: Path, metadata: dict[str, str] | None) -> dict[str, dict[str, Any]]:
    """Per component, the LoraConfig keywords from the safetensors metadata, else from lora_config.json."""
    if metadata and metadata.get(METADATA_KEY):
        packed = json.loads(metadata[METADATA_KEY])
        configs: dict[str, dict[str, Any]] = collections.defaultdict(dict)
        for key, value in packed.items():
            component, _, name = key.partition(".")
            configs[component][name] = value
        return dict(configs)
    beside = file.parent / LORA_CONFIG_NAME
    if beside.is_file():
        stored = json.loads(beside.read_text())
        return {c: stored[c] for c in COMPONENTS if isinstance(stored.get(c), dict)}
    peft_config = file.parent / "adapter_config.json"
    if file.name == PEFT_WEIGHTS_NAME and peft_config.is_file():
        return {"unet": json.loads(peft_config.read_text())}
    return {}


def read_lora_file(path: str | os.PathLike) -> dict[str, LoraWeights]:
    """Read an adapter file (any format in the module docstring) into one `LoraWeights` per component.

    Args:
        path: a folder (see `find_lora_file`) or a `.safetensors` file.
    Returns:
        {"unet": ..., "text_encoder": ...}, holding the components the file has.
    """
    from safetensors import safe_open

    file = find_lora_file(path)
    check_safetensors_file(file)
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if not tensors:
        raise ValueError(f"{file} holds no tensors.")
    configs = _read_configs(file, metadata)
    parts: dict[str, LoraWeights] = {}
    unknown = []
    for key, tensor in tensors.items():
        component, rest, flat = _split_component(key)
        if "lora_magnitude_vector" in rest or re.search(r"\.lora_B(\.[^.]+)?\.bias$", rest):
            raise ValueError(f"{file}: {key!r} is a DoRA or LoRA-bias weight; only plain LoRA adapters load.")
        parsed = _parse_key(rest)
        if parsed is None:
            unknown.append(key)
            continue
        kind, match = parsed
        part = parts.setdefault(component, LoraWeights(config=configs.get(component), flat_names=flat))
        module = match["module"]
        if kind == "attn_processor":
            module = f"{module}.{_ATTN_PROCESSOR_NAMES[component][match['proj']]}"
        if kind == "alpha":
            part.alpha[module] = float(tensor.item())
        elif match["role"] in ("A", "down"):
            part.lora_A[module] = tensor
        else:
            part.lora_B[module] = tensor
    if unknown:
        raise ValueError(
            f"{file} has {len(unknown)} keys that are not LoRA weights of a known format, e.g. {unknown[:3]}; "
            "expected diffusers/peft keys (unet.<module>.lora_A.weight), older diffusers keys (.lora.down.weight, "
            ".processor.to_q_lora.down.weight) or kohya keys (lora_unet_<module>.lora_down.weight)."
        )
    for component, part in parts.items():
        unpaired = sorted(set(part.lora_A) ^ set(part.lora_B))
        if unpaired:
            raise ValueError(
                f"{file}: the {component} layer {unpaired[0]!r} has only one of its two LoRA matrices."
            )
        part.alpha = {m: a for m, a in part.alpha.items() if m in part.lora_A}
    return parts
