"""Checks of user input shared by the CLI, `generate` and the pipeline.

Each check is cheap (no model, no tensor work beyond a finiteness test) so callers run it before anything slow,
and each failure is one sentence that names the argument or file and the fix. They raise ValueError (a bad value),
TypeError (a wrong type) or FileExistsError (a file that would be replaced); the CLI prints those without a
traceback and exits with code 2.

| limit            | value                        | why                                                          |
|------------------|------------------------------|--------------------------------------------------------------|
| seed             | 0 .. 2**64 − 1               | what `torch.Generator.manual_seed` takes                     |
| random seed      | None, or -1 on the CLI       | a fresh seed from the OS, reported so the image can be remade |
| image side       | ≤ 8 × the model's native side | beyond that the UNet's attention exhausts memory before any   |
|                  |                              | image comes out, and the model was never trained there        |
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from pathlib import Path

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts 0 .. 2**64 - 1
RANDOM_SEED = -1  # `--seed -1`: draw a fresh random seed (as None does)
MAX_SIDE_FACTOR = 8  # height and width at most this many times the model's native side


def check_finite(name: str, value: object, example: str = "1.0") -> float:
    """`value` as a float; TypeError for a non-number (a str "5", a bool), ValueError for nan or ±inf."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number such as {example}, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} is not a finite number; pass a number such as {example}.")
    return float(value)


def finite_float(text: str) -> float:
    """argparse `type=` for a finite float: `--guidance nan` is refused by the parser (exit code 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def check_seed(seed: int | None, count: int = 1) -> int | None:
    """The seed to use: None (or -1) stays None for "random"; else an int with seed + count - 1 <= MAX_SEED."""
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed == RANDOM_SEED):
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(
            f"seed must be an int (or None / -1 for a random seed), got {type(seed).__name__} {seed!r}."
        )
    highest = MAX_SEED - (count - 1)
    if not 0 <= seed <= highest:
        raise ValueError(
            f"seed={seed} is out of range: pass 0 .. {highest} (image i of {count} uses seed + i, and torch takes "
            f"seeds up to 2**64 - 1), or -1 for a random seed."
        )
    return seed


def random_seed() -> int:
    """A fresh 32-bit seed from the operating system (short enough to type back in)."""
    return int.from_bytes(os.urandom(4), "little")


def parse_lora_spec(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale); the scale defaults to 1.0.

    A text that names an existing file or folder is a path even if it holds a colon; otherwise what follows the last
    colon must be a finite number (`out/lora:abc` is a bad scale, not a missing file named `lora:abc`).
    """
    path, sep, scale = text.rpartition(":")
    if Path(text).exists() or not sep or not path or scale.startswith(("/", "\\")):
        return text, 1.0
    try:
        value = float(scale)
    except ValueError:
        raise ValueError(
            f"--lora {text!r}: the scale {scale!r} is not a number; write PATH:SCALE with a number, e.g. "
            f"{path}:0.8 (or PATH alone for scale 1.0)."
        ) from None
    return path, check_finite(f"--lora {text!r}: the scale", value, "0.8")


def check_image_size(height: object, width: object, native_side: int, multiple: int) -> None:
    """height and width: positive ints, multiples of `multiple`, at most MAX_SIDE_FACTOR × `native_side`."""
    largest = max(MAX_SIDE_FACTOR * native_side // multiple * multiple, multiple)
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(
                f"{name}={value!r} must be a positive int divisible by {multiple} (the VAE factor × the UNet's "
                f"down-sampling factor), e.g. {native_side}."
            )
        if value > largest:
            raise ValueError(
                f"{name}={value} is larger than this model can make: at most {largest} px ({MAX_SIDE_FACTOR} × its "
                f"native {native_side} px); pass a smaller {name}, e.g. {native_side}."
            )


def check_output_file(path: Path, overwrite: bool, name: str = "output") -> None:
    """`path` can be written: its folder exists and is writable, and it is not an existing file unless overwrite."""
    if path.is_dir():
        raise ValueError(
            f"{name}={str(path)!r} is a folder; pass a file name in it, e.g. {str(path / 'out.png')!r}."
        )
    if not path.parent.is_dir():
        raise ValueError(
            f"{name}={str(path)!r}: the folder {str(path.parent)!r} does not exist; create it first or pick "
            "another path."
        )
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"{name}={str(path)!r}: the folder {str(path.parent)!r} is not writable; pick another path."
        )
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{name}={str(path)!r} already exists and would be replaced; pass --overwrite (overwrite=True) to "
            "replace it, or pick another name."
        )


def read_json_file(file: Path) -> dict:
    """The JSON object in `file`; ValueError naming the file when it is not valid JSON."""
    import json

    try:
        return json.loads(Path(file).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON ({error}); fix the file or copy it again.") from None


def check_safetensors_file(file: str | os.PathLike) -> None:
    """Read the header of a safetensors file; a truncated or corrupt one raises ValueError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except SafetensorError as error:
        raise ValueError(
            f"{file} is not a readable safetensors file ({error}); it is truncated or corrupt: copy or download it "
            "again."
        ) from None


def check_safetensors_folder(folder: Path) -> None:
    """`check_safetensors_file` on every `*.safetensors` file directly in `folder`."""
    for file in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(file)


def check_finite_tensor(name: str, tensor, fix: str) -> None:
    """ValueError when `tensor` holds NaN or ±inf, counting them; `fix` says what to do."""
    bad = int((~tensor.isfinite()).sum())
    if bad:
        raise ValueError(f"{name}: {bad} of {tensor.numel()} values are not finite (NaN or inf); {fix}")


def check_generator(generator: object) -> None:
    """None, a torch.Generator, or a list of them; anything else (a seed such as 0) is refused with the fix."""
    import torch

    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        shown = f"{type(generator).__name__} {generator!r}"[:200]
        raise TypeError(
            f"generator must be a torch.Generator or a list of them, got {shown}; pass "
            "torch.Generator().manual_seed(SEED)."
        )
