"""The training configuration: one frozen dataclass of every flag, filled from a YAML file and the command line.

    accelerate launch train/train_t2i.py --config train/configs/example_t2i.yaml --learning_rate 5e-5

Values come from, lowest to highest priority: the field defaults below, the YAML file given by `--config` (a
mapping of field names to values), then flags on the command line. Flag names are those of diffusers'
`examples/text_to_image/train_text_to_image.py` where both have the option, so its commands carry over.

Everything that can be checked without touching a model or the data is checked when the config is built
(`TrainConfig.__post_init__`), so a typo fails in a second with a message naming the flag, not after minutes of
model loading. Checks that need a file (the model's down-sampling factor, the dataset's columns) are done by the
task script before any weights are loaded.

Scripts with more options (LoRA, VAE, CLIP) subclass `TrainConfig`, add fields, override `validate()` calling
`super().validate()`, and pass their class to `parse_config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # ε, v, x₀ (diffusers' names)
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)  # diffusers.optimization.get_scheduler names


LATENT_SAMPLES = ("mean", "sample")  # what z0 is: the VAE posterior's mean, or a sample of it


class ConfigError(ValueError):
    """A bad option value, found before any model is loaded; the message names the flag and the fix."""


def _flag(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - argparse's word
    """A dataclass field whose `help` is the flag's documentation."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `train/train_t2i.py`. Read-only once built; `dataclasses.replace` makes a changed copy."""

    # ---- model ---------------------------------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = _flag(
        None,
        "SD-layout folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or hub id. Its VAE "
        "and text encoder are frozen; its UNet is trained unless --unet_config is given.",
    )
    unet_config: str | None = _flag(
        None,
        "JSON or YAML file of a UNetConfig (field names of latentdiff.models.unet.UNetConfig, or a diffusers "
        "UNet2DConditionModel config.json): train a randomly initialised UNet of this shape from scratch.",
    )
    pretrained_vae_model_name_or_path: str | None = _flag(
        None,
        "Folder of a diffusers AutoencoderKL (or an SD folder with vae/) used instead of the one in "
        "--pretrained_model_name_or_path.",
    )
    pretrained_text_encoder_name_or_path: str | None = _flag(
        None,
        "Folder with a transformers CLIP text model and tokenizer (or an SD folder with text_encoder/ and "
        "tokenizer/) used instead of the one in --pretrained_model_name_or_path.",
    )
    noise_scheduler_config: str | None = _flag(
        None,
        "scheduler_config.json of the training noise schedule; default: the scheduler/ of "
        "--pretrained_model_name_or_path, else Stable Diffusion's scaled_linear schedule.",
    )
    prediction_type: str | None = _flag(
        None,
        "What the UNet learns to predict: epsilon | v_prediction | sample (x0). Default: the noise scheduler's.",
        choices=PREDICTION_TYPES,
    )
    train_text_encoder: bool = _flag(
        False,
        "Train the text encoder together with the UNet (same optimizer and learning rate; exported with the "
        "pipeline). A text tower pre-trained contrastively may not encode every word the images depend on "
        "(positions, say); training it on the diffusion loss teaches it those.",
    )
    text_encoder_init: str = _flag(
        "pretrained",
        "pretrained: the text encoder's weights as loaded; random: a text encoder of the same config (and the same "
        "tokenizer) with fresh weights, trained with the UNet (needs --train_text_encoder).",
        choices=("pretrained", "random"),
    )
    text_encoder_layers: int | None = _flag(
        None,
        "With --text_encoder_init random: the fresh text encoder's number of transformer layers (default: its "
        "config's). 0 leaves each token its own embedding plus its position: words never mix, so a colour and a "
        "shape the data never showed together are still read as that colour and that shape.",
    )
    cache_dir: str | None = _flag(None, "Where hub downloads (models and datasets) are stored.")

    # ---- data ----------------------------------------------------------------------------------------------------
    dataset_name: str | None = _flag(
        None, "A datasets hub name, or a local folder datasets can read (used instead of --train_data_dir)."
    )
    dataset_config_name: str | None = _flag(None, "The dataset's config name, if it has several.")
    train_data_dir: str | None = _flag(
        None, "An imagefolder: images plus a metadata.jsonl with a file_name and a caption per line."
    )
    image_column: str = _flag("image", "The dataset column holding the images.")
    caption_column: str = _flag(
        "text",
        "The dataset column holding the captions: a string, or a list of strings (one is picked at random).",
    )
    max_train_samples: int | None = _flag(
        None, "Use only the first N samples of the dataset (for quick runs)."
    )
    resolution: int = _flag(
        512, "Training images are resized (shorter side) then cropped to this square side."
    )
    center_crop: bool = _flag(False, "Crop the center of the resized image (default: a random crop).")
    random_flip: bool = _flag(False, "Flip half of the images horizontally (chosen per sample and epoch).")
    dataloader_num_workers: int = _flag(0, "Data-loading worker processes (0: load in the training process).")
    cache_latents: bool = _flag(
        False,
        "Encode every image (and its mirror image) with the VAE and every caption with the text encoder once, keep "
        "them on disk, and train from the cached VAE posteriors. Reused by later runs with the same VAE, text "
        "encoder, resolution, crop/flip settings and data; recomputed when one of them changes.",
    )
    latents_cache_dir: str | None = _flag(
        None,
        "Where --cache_latents keeps its files (default: <output_dir>/latent_cache); share it between runs.",
    )

    # ---- optimisation ------------------------------------------------------------------------------------------
    train_batch_size: int = _flag(
        16, "Batch size per process (the global batch is this x number of processes)."
    )
    num_train_epochs: int = _flag(100, "Epochs to train when --max_train_steps is not given.")
    max_train_steps: int | None = _flag(None, "Optimizer steps to train; overrides --num_train_epochs.")
    gradient_accumulation_steps: int = _flag(1, "Micro-batches accumulated into each optimizer step.")
    gradient_checkpointing: bool = _flag(
        False, "Recompute UNet activations in the backward pass to save memory."
    )
    learning_rate: float = _flag(1e-4, "Peak learning rate (after warm-up).")
    scale_lr: bool = _flag(
        False, "Multiply --learning_rate by batch size x accumulation steps x number of processes."
    )
    lr_scheduler: str = _flag("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _flag(500, "Optimizer steps of linear warm-up from 0 to --learning_rate.")
    adam_beta1: float = _flag(0.9, "AdamW beta1.")
    adam_beta2: float = _flag(0.999, "AdamW beta2.")
    adam_weight_decay: float = _flag(1e-2, "AdamW decoupled weight decay.")
    adam_epsilon: float = _flag(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _flag(1.0, "Clip the global gradient norm to this value (0 or less: no clipping).")
    mixed_precision: str | None = _flag(
        None, "no | fp16 | bf16; default: the accelerate config's.", choices=MIXED_PRECISIONS
    )
    allow_tf32: bool = _flag(False, "Allow TF32 matrix multiplies on Ampere+ GPUs.")
    seed: int | None = _flag(
        None,
        "Seed of every random choice (data order, crops, noise, timesteps, dropout); default: drawn once "
        "and stored in the checkpoints, so a resumed run continues the same sequence.",
    )

    # ---- diffusion objective -----------------------------------------------------------------------------------
    snr_gamma: float | None = _flag(
        None, "Min-SNR-gamma loss weighting (arXiv:2303.09556), e.g. 5.0; correct for each prediction type."
    )
    noise_offset: float = _flag(
        0.0, "Scale of the per-channel offset added to the noise (0: none), e.g. 0.05."
    )
    latent_sample: str = _flag(
        "sample",
        "Train on a sample of the VAE posterior, z0 = mu + sigma*eps (sample, as Stable Diffusion's VAE is "
        "trained), or on its mean mu (mean: for a VAE whose decoder was trained on the mean, such as "
        "train_vae.py --latent_sample mean; its sigma carries no information and sampling it buries the image "
        "in noise).",
        choices=LATENT_SAMPLES,
    )
    cond_dropout_prob: float = _flag(
        0.1,
        "Probability, per sample and step, of replacing the caption by the empty prompt (classifier-free "
        "guidance needs it).",
    )
    use_ema: bool = _flag(False, "Keep an exponential moving average of the trained weights; it is exported.")
    ema_decay: float = _flag(
        0.9999, "EMA decay; the effective decay is min(ema_decay, (1+n)/(10+n)) at update n."
    )

    # ---- checkpoints, logging, validation ----------------------------------------------------------------------
    output_dir: str = _flag(
        "sd-model-finetuned", "Where checkpoints, logs, validation images and the model go."
    )
    logging_dir: str = _flag("logs", "TensorBoard folder, relative to --output_dir.")
    report_to: str = _flag("tensorboard", "tensorboard | wandb | all | none.")
    tracker_project_name: str = _flag("text2image-fine-tune", "Project name given to the trackers.")
    checkpointing_steps: int | None = _flag(
        500, "Save a resumable checkpoint every N optimizer steps (none: only at the end)."
    )
    checkpoints_total_limit: int | None = _flag(None, "Keep at most this many checkpoints (oldest deleted).")
    resume_from_checkpoint: str | None = _flag(
        None, "A checkpoint folder, or 'latest' for the newest complete one in --output_dir."
    )
    validation_prompts: list[str] | None = _flag(
        None, "Prompts rendered into a grid every --validation_steps (prompt i uses seed i)."
    )
    validation_steps: int | None = _flag(
        None,
        "Validate every N optimizer steps (grid of --validation_prompts, validation loss); always at the end.",
    )
    validation_holdout: int = _flag(
        0, "Hold this many samples out of training for a fixed-noise validation loss (0: none)."
    )
    validation_num_inference_steps: int = _flag(25, "Sampler steps of the validation images.")
    validation_guidance_scale: float = _flag(7.5, "Classifier-free guidance scale of the validation images.")
    local_rank: int = _flag(
        -1, "Set by old launchers (torch.distributed.launch); ignored, accelerate reads it."
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the values on their own (no file is read); raise ConfigError naming the flag, value and fix.

        Subclasses for other tasks (VAE, CLIP) override `validate_model` and keep the loop and data checks.
        """
        self.validate_loop()
        self.validate_model()

    def validate_loop(self) -> None:
        """Checks of the data, optimisation, checkpoint and validation options every training script shares."""
        _choice("latent_sample", self.latent_sample, LATENT_SAMPLES)
        if self.dataset_name is None and self.train_data_dir is None:
            raise ConfigError(
                "no training data: pass --dataset_name (hub name or folder) or --train_data_dir."
            )
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS, optional=True)
        _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        for name in ("resolution", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs"):
            _at_least(name, getattr(self, name), 1)
        for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "validation_steps"):
            _at_least(name, getattr(self, name), 1, optional=True)
        for name in ("lr_warmup_steps", "dataloader_num_workers", "validation_holdout"):
            _at_least(name, getattr(self, name), 0)
        _at_least("max_train_samples", self.max_train_samples, 1, optional=True)
        _at_least("validation_num_inference_steps", self.validation_num_inference_steps, 1)
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate={self.learning_rate} must be positive, e.g. 1e-4.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay={self.ema_decay} must lie in [0, 1), e.g. 0.9999.")
        if self.text_encoder_init == "random" and not self.train_text_encoder:
            raise ConfigError(
                "--text_encoder_init random gives the UNet an untrained text encoder: add --train_text_encoder."
            )
        _at_least("text_encoder_layers", self.text_encoder_layers, 0, optional=True)
        if self.text_encoder_layers is not None and self.text_encoder_init != "random":
            raise ConfigError(
                "--text_encoder_layers sets the depth of a fresh text encoder: add --text_encoder_init random."
            )
        if self.cache_latents and not self.center_crop:
            raise ConfigError(
                "--cache_latents stores one crop per image, so random crops cannot be cached: add --center_crop "
                "(or drop --cache_latents)."
            )
        if (
            self.resume_from_checkpoint not in (None, "latest")
            and not Path(self.resume_from_checkpoint).is_dir()
        ):
            raise ConfigError(
                f"--resume_from_checkpoint={self.resume_from_checkpoint!r} is not a folder; pass a checkpoint "
                "folder (<output_dir>/checkpoint-N) or 'latest'."
            )
        if self.validation_prompts is not None and isinstance(self.validation_prompts, str):
            raise ConfigError("--validation_prompts must be a list of prompts, not one string.")

    def validate_model(self) -> None:
        """Checks of the text-to-image model and objective options."""
        if self.pretrained_model_name_or_path is None:
            missing = [
                flag
                for flag, value in (
                    ("--unet_config", self.unet_config),
                    ("--pretrained_vae_model_name_or_path", self.pretrained_vae_model_name_or_path),
                    ("--pretrained_text_encoder_name_or_path", self.pretrained_text_encoder_name_or_path),
                )
                if value is None
            ]
            if missing:
                raise ConfigError(
                    "no model: pass --pretrained_model_name_or_path (an SD-layout folder or hub id), or all of "
                    f"--unet_config, --pretrained_vae_model_name_or_path and --pretrained_text_encoder_name_or_path "
                    f"(missing: {', '.join(missing)})."
                )
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES, optional=True)
        if not 0.0 <= self.cond_dropout_prob <= 1.0:
            raise ConfigError(
                f"--cond_dropout_prob={self.cond_dropout_prob} must lie in [0, 1] (default 0.1)."
            )
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ConfigError(
                f"--snr_gamma={self.snr_gamma} must be positive (5.0 is the paper's), or left unset."
            )
        if self.noise_offset < 0:
            raise ConfigError(
                f"--noise_offset={self.noise_offset} must be >= 0 (0 turns it off; 0.05 is common)."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for the trackers and the run's saved config)."""
        return dataclasses.asdict(self)


def _choice(name: str, value: Any, choices: tuple[str, ...], optional: bool = False) -> None:
    if optional and value is None:
        return
    if value not in choices:
        raise ConfigError(f"--{name}={value!r} is unknown; choose one of {', '.join(choices)}.")


def _at_least(name: str, value: Any, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"--{name}={value!r} must be an integer >= {low}.")


ConfigT = TypeVar("ConfigT", bound=TrainConfig)


# ---- parsing -----------------------------------------------------------------------------------------------------


def _field_kind(annotation: Any) -> tuple[type, bool]:
    """(base type, is a list) of a field annotation such as `int | None` or `list[str] | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """A YAML value converted to the field's type (YAML reads `1e-4` as a string), or a ValueError naming it."""
    if value is None:
        return None
    kind, is_list = _field_kind(annotation)
    if is_list:
        if isinstance(value, str) or not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list of {kind.__name__}, got {value!r}.")
        return [_coerce(name, v, kind) for v in value]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}.")
        return value
    if kind is int:
        if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        ):
            raise ConfigError(f"{name}: expected an integer, got {value!r}.")
        return int(value)
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}.") from None
    if kind is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{name}: expected a string, got {value!r}.")
        return str(value)
    return value


def load_yaml_values(path: str | Path, config_class: type[TrainConfig] = TrainConfig) -> dict[str, Any]:
    """The YAML file's mapping, each key checked against the config's fields and each value converted."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config={str(path)!r}: no such file.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config={str(path)!r} must hold a mapping of option names to values.")
    hints = typing.get_type_hints(config_class)
    names = [f.name for f in dataclasses.fields(config_class)]
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).lstrip("-").replace("-", "_")
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown option {key!r}{hint}.")
        out[key] = _coerce(f"{path}: {key}", value, hints[key])
    return out


def build_parser(config_class: type[TrainConfig] = TrainConfig) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field; defaults are suppressed so that only given flags come back."""
    parser = argparse.ArgumentParser(
        description=(config_class.__doc__ or "").strip().splitlines()[0],
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of option values; command-line flags override it.")
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kind, is_list = _field_kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})"
        flags = [f"--{f.name}"]
        if f.name == "local_rank":  # torch.distributed.launch passes --local-rank
            flags.append("--local-rank")
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, help=help_text)
        elif is_list:
            parser.add_argument(*flags, type=kind, nargs="+", help=help_text)
        else:
            parser.add_argument(
                *flags, type=_cli_type(kind), choices=f.metadata.get("choices"), help=help_text
            )
    return parser


def _cli_type(kind: type) -> Any:
    if kind is int:
        return int
    if kind is float:
        return float
    return str


def parse_config(argv: list[str] | None = None, config_class: type[ConfigT] = TrainConfig) -> ConfigT:  # type: ignore[assignment]
    """Build the config from `--config FILE` (optional) and the flags in `argv` (default: sys.argv[1:]).

    Unknown flags and unknown YAML keys are errors (argparse exits with status 2 for flags; a YAML key raises
    ValueError naming the closest option). The result is frozen and validated.
    """
    parser = build_parser(config_class)
    given = vars(parser.parse_args(argv))
    yaml_path = given.pop("config", None)
    values = load_yaml_values(yaml_path, config_class) if yaml_path else {}
    values.update(given)
    return config_class(**values)
