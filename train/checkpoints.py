"""Checkpoints of a run: written atomically, found, rotated and read back.

A checkpoint `<output_dir>/checkpoint-N` holds what `accelerator.save_state` writes (weights, optimizer, LR schedule,
RNG states), `ema.safetensors` when an EMA is kept, and `trainer_state.json` (the step, the seed and what the data
position depends on). It is written into `.tmp-checkpoint-N` and renamed once complete, so a crash never leaves a
partial checkpoint that `latest` would pick; `is_complete` is the one test of completeness (a marker file written
last would be added there and in `save_checkpoint`'s final step).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"


def is_complete(path: Path) -> bool:
    """Whether `path` is a checkpoint that was written to the end."""
    return (path / STATE_FILE).is_file()


def read_state(path: Path) -> dict[str, Any]:
    """The loop's state stored in a checkpoint (`trainer_state.json`)."""
    return json.loads((path / STATE_FILE).read_text())


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (`checkpoint-N`), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: None, the newest complete one for 'latest' (None if there is none), or the
    given folder, which must be a complete checkpoint."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not is_complete(path):
        raise ValueError(
            f"--resume_from_checkpoint={str(path)!r} is not a complete checkpoint (no {STATE_FILE}); pass a "
            f"{CHECKPOINT_PREFIX}N folder or 'latest'."
        )
    return path


def rotate_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints beyond `total_limit`; returns the deleted folders."""
    if total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - total_limit)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete the temporary folders a crash during a save left behind (main process)."""
    for stale in output_dir.glob(f"{TMP_PREFIX}{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    step: int,
    state: dict[str, Any],
    ema=None,
    total_limit: int | None = None,
) -> Path:
    """Write `checkpoint-<step>` atomically (every process calls this) and rotate; returns its path.

    state: the loop's JSON-able state (written by the main process as trainer_state.json); ema: a `train.ema.EMA`.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        if ema is not None:
            ema.save(tmp / EMA_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved before (e.g. by a run that was resumed): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for path in rotate_checkpoints(output_dir, total_limit):
            logger.info("deleted old checkpoint %s (--checkpoints_total_limit %s)", path, total_limit)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, ema=None) -> tuple[dict[str, Any], bool]:
    """Restore what `save_checkpoint` wrote; returns (the loop's state, whether the EMA was restored)."""
    state = read_state(path)
    accelerator.load_state(str(path))
    ema_restored = ema is not None and (path / EMA_FILE).is_file()
    if ema_restored:
        ema.load(path / EMA_FILE)
    return state, ema_restored
