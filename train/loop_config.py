"""The loop's configuration: the flags every training script shares (data, optimisation, checkpoints, validation).

    accelerate launch train/train_t2i.py --config train/configs/example_t2i.yaml --learning_rate 5e-5

Each task's config (`train.tasks.*`) extends `LoopConfig` with only its own flags. Flag names are those of
diffusers' `examples/text_to_image/train_text_to_image.py` where both have the option, so its commands carry over.

A flag's rule is declared once, where the flag is (`flag(..., choices=..., at_least=...)`), and checked when the
config is built, so a typo fails in a second with a message naming the flag, not after minutes of model loading.
Rules that tie several flags together live in the class's `check_combinations()` (a subclass calls `super()`'s).
Checks that need a file (the model's down-sampling factor, the dataset's columns) are done by the task before any
weights are loaded. The values come from `train.arguments.parse_config` (defaults < YAML file < command line).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)  # diffusers.optimization.get_scheduler names


class ConfigError(ValueError):
    """A bad option value, found before any model is loaded; the message names the flag and the fix."""


def flag(
    default: Any,
    help: str,  # noqa: A002 - argparse's word
    *,
    choices: tuple[str, ...] | None = None,
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
    example: str | None = None,
    aliases: tuple[str, ...] = (),
    exists: str | None = None,
) -> Any:
    """A dataclass field whose metadata is the flag's documentation (`help`) and its one rule.

    choices: the allowed strings; at_least/above/below/at_most: bounds of a number (integers are also checked to be
    integers, by the field's type); example: a good value, quoted in the error; aliases: other flag names (e.g.
    diffusers' name for the same option); exists: "file" or "folder", a path that must be there.
    """
    metadata = {
        "help": help,
        "choices": choices,
        "at_least": at_least,
        "above": above,
        "below": below,
        "at_most": at_most,
        "example": example,
        "aliases": aliases,
        "exists": exists,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def field_kind(annotation: Any) -> tuple[type, bool]:
    """(base type, is a list) of a field annotation such as `int | None` or `list[str] | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) is not list:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def check_flag(name: str, value: Any, annotation: Any, metadata: dict[str, Any]) -> None:
    """Raise ConfigError unless `value` obeys the rule declared with the flag (None always passes)."""
    if value is None:
        return
    exists = metadata.get("exists")
    if exists == "file" and not Path(value).is_file():
        raise ConfigError(f"--{name}={value!r}: no such file.")
    if exists == "folder" and not Path(value).is_dir():
        raise ConfigError(f"--{name}={value!r} is not a folder.")
    choices = metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"--{name}={value!r} is unknown; choose one of {', '.join(choices)}.")
    bounds = [(k, metadata.get(k)) for k in ("at_least", "above", "below", "at_most")]
    bounds = [(k, b) for k, b in bounds if b is not None]
    if not bounds:
        return
    kind, _ = field_kind(annotation)
    example = f", e.g. {metadata['example']}" if metadata.get("example") else ""
    tests = {
        "at_least": (lambda v, b: v >= b, ">="),
        "above": (lambda v, b: v > b, ">"),
        "below": (lambda v, b: v < b, "<"),
        "at_most": (lambda v, b: v <= b, "<="),
    }
    integer = kind is int
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or (integer and not isinstance(value, int))
        or not math.isfinite(value)
        or not all(tests[k][0](value, b) for k, b in bounds)
    ):
        rule = " and ".join(f"{tests[k][1]} {b}" for k, b in bounds)
        raise ConfigError(f"--{name}={value!r} must be {'an integer ' if integer else ''}{rule}{example}.")


@dataclass(frozen=True)
class LoopConfig:
    """The flags of the training loop that every script shares. Read-only once built."""

    # What a task's export writes at the top of --output_dir, and the caches it keeps there (`train.output_dir`);
    # whether its rows need a caption (those without one are counted: --max_missing_captions).
    EXPORTED: ClassVar[tuple[str, ...]] = ()
    CACHES: ClassVar[tuple[str, ...]] = ()
    USES_CAPTIONS: ClassVar[bool] = True

    # ---- data ----------------------------------------------------------------------------------------------------
    dataset_name: str | None = flag(
        None, "A datasets hub name, or a local folder datasets can read (used instead of --train_data_dir)."
    )
    dataset_config_name: str | None = flag(None, "The dataset's config name, if it has several.")
    train_data_dir: str | None = flag(
        None, "An imagefolder: images plus a metadata.jsonl with a file_name and a caption per line."
    )
    image_column: str = flag("image", "The dataset column holding the images.")
    caption_column: str = flag(
        "text",
        "The dataset column holding the captions: a string, or a list of strings (one is picked at random).",
    )
    max_missing_captions: float = flag(
        0.5,
        "Largest share of rows allowed without a caption (missing, null or empty: they train as the empty prompt); "
        "the rows without one are counted and reported, and more than this share stops the run before training.",
        at_least=0,
        at_most=1,
        example="0.5",
    )
    cache_dir: str | None = flag(None, "Where hub downloads (models and datasets) are stored.")
    max_train_samples: int | None = flag(
        None, "Use only the first N samples of the dataset (for quick runs).", at_least=1
    )
    resolution: int = flag(
        512, "Training images are resized (shorter side) then cropped to this square side.", at_least=1
    )
    center_crop: bool = flag(False, "Crop the center of the resized image (default: a random crop).")
    random_flip: bool = flag(False, "Flip half of the images horizontally (chosen per sample and epoch).")
    dataloader_num_workers: int = flag(
        0, "Data-loading worker processes (0: load in the training process).", at_least=0
    )

    # ---- optimisation ------------------------------------------------------------------------------------------
    train_batch_size: int = flag(
        16, "Batch size per process (the global batch is this x number of processes).", at_least=1
    )
    num_train_epochs: int = flag(100, "Epochs to train when --max_train_steps is not given.", at_least=1)
    max_train_steps: int | None = flag(
        None, "Optimizer steps to train; overrides --num_train_epochs.", at_least=1
    )
    gradient_accumulation_steps: int = flag(
        1, "Micro-batches accumulated into each optimizer step.", at_least=1
    )
    gradient_checkpointing: bool = flag(False, "Recompute activations in the backward pass to save memory.")
    learning_rate: float = flag(1e-4, "Peak learning rate (after warm-up).", above=0, example="1e-4")
    scale_lr: bool = flag(
        False, "Multiply --learning_rate by batch size x accumulation steps x number of processes."
    )
    lr_scheduler: str = flag("constant", "Learning-rate schedule.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = flag(
        500, "Optimizer steps of linear warm-up from 0 to --learning_rate.", at_least=0
    )
    adam_beta1: float = flag(0.9, "AdamW beta1.", at_least=0, below=1)
    adam_beta2: float = flag(0.999, "AdamW beta2.", at_least=0, below=1)
    adam_weight_decay: float = flag(1e-2, "AdamW decoupled weight decay.", at_least=0)
    adam_epsilon: float = flag(1e-8, "AdamW epsilon.", above=0)
    max_grad_norm: float = flag(
        1.0, "Clip the global gradient norm to this value (0: no clipping).", at_least=0
    )
    mixed_precision: str | None = flag(
        None, "no | fp16 | bf16; default: the accelerate config's.", choices=MIXED_PRECISIONS
    )
    allow_tf32: bool = flag(False, "Allow TF32 matrix multiplies on Ampere+ GPUs.")
    seed: int | None = flag(
        None,
        "Seed of every random choice (data order, crops, noise, timesteps, dropout); default: drawn once "
        "and stored in the checkpoints, so a resumed run continues the same sequence.",
        at_least=0,
        at_most=2**32 - 1,
        example="0 (leave it unset to draw a random seed)",
    )
    use_ema: bool = flag(False, "Keep an exponential moving average of the trained weights; it is exported.")
    ema_decay: float = flag(
        0.9999,
        "EMA decay; the effective decay is min(ema_decay, (1+n)/(10+n)) at update n.",
        at_least=0,
        below=1,
        example="0.9999",
    )

    # ---- checkpoints, logging, validation ----------------------------------------------------------------------
    output_dir: str = flag(
        "sd-model-finetuned", "Where checkpoints, logs, validation outputs and the model go."
    )
    logging_dir: str = flag("logs", "TensorBoard folder, relative to --output_dir.")
    report_to: str = flag("tensorboard", "tensorboard | wandb | all | none.")
    tracker_project_name: str = flag("text2image-fine-tune", "Project name given to the trackers.")
    checkpointing_steps: int | None = flag(
        500, "Save a resumable checkpoint every N optimizer steps (none: only at the end).", at_least=1
    )
    checkpoints_total_limit: int | None = flag(
        None, "Keep at most this many checkpoints (oldest deleted).", at_least=1
    )
    resume_from_checkpoint: str | None = flag(
        None,
        "A checkpoint folder, or 'latest' for the newest intact one in --output_dir (a damaged newer one is "
        "skipped with a warning).",
    )
    overwrite_output_dir: bool = flag(
        False,
        "Delete an earlier run in --output_dir (its checkpoints, export, logs and validation images; never other "
        "files) and start again. Without it or --resume_from_checkpoint, a non-empty --output_dir is refused.",
    )
    validation_steps: int | None = flag(
        None, "Validate every N optimizer steps (and always at the end).", at_least=1
    )
    validation_epochs: int | None = flag(
        None,
        "Validate every N epochs too (diffusers' flag; the end of an epoch as the data order counts it).",
        at_least=1,
    )
    validation_holdout: int = flag(
        0, "Hold this many samples out of training for validation (0: none).", at_least=0
    )
    local_rank: int = flag(
        -1, "Set by old launchers (torch.distributed.launch); ignored, accelerate reads it."
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_flag(f.name, getattr(self, f.name), hints[f.name], f.metadata)
        self.check_combinations()

    def check_combinations(self) -> None:
        """Rules that tie several flags together (each flag's own rule is declared with it)."""
        if self.dataset_name is None and self.train_data_dir is None:
            raise ConfigError(
                "no training data: pass --dataset_name (hub name or folder) or --train_data_dir."
            )
        if (
            self.resume_from_checkpoint not in (None, "latest")
            and not Path(self.resume_from_checkpoint).is_dir()
        ):
            raise ConfigError(
                f"--resume_from_checkpoint={self.resume_from_checkpoint!r} is not a folder; pass a checkpoint "
                "folder (<output_dir>/checkpoint-N) or 'latest'."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for the trackers and the run's saved config)."""
        return dataclasses.asdict(self)
