"""Checkpoints of a run: written atomically, found, rotated and read back.

A checkpoint `<output_dir>/checkpoint-N` holds what `accelerator.save_state` writes (weights, optimizer, LR schedule,
RNG states), `ema.safetensors` when an EMA is kept, `trainer_state.json` (the step, the seed and what the data
position depends on) and, written last, `checksums.json`: the size and SHA-256 of every other file. It is written
into `.tmp-checkpoint-N` and renamed once complete, so a crash never leaves a partial checkpoint that `latest` would
pick; `is_complete` (the checksums file is there) is the one test of completeness, and `damage` re-reads the files
against their checksums before a resume, so a checkpoint truncated or corrupted later (a full disk, an interrupted
copy) is found before it is loaded: `latest` then falls back to the newest intact one with a warning, and a named
checkpoint is refused with the damaged file's name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger

from train.loop_config import ConfigError

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
CHECKSUMS_FILE = "checksums.json"  # written last: its presence marks a complete checkpoint


def is_complete(path: Path) -> bool:
    """Whether `path` is a checkpoint that was written to the end: its checksums file, written last, is there (or,
    in a checkpoint written before checksums existed, its trainer_state.json)."""
    return (path / CHECKSUMS_FILE).is_file() or (path / STATE_FILE).is_file()


def file_checksums(path: Path) -> dict[str, dict[str, Any]]:
    """{relative file name: {"size": bytes, "sha256": hex digest}} of every file under `path` but the checksums."""
    sums = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE):
        with file.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        sums[file.relative_to(path).as_posix()] = {"size": file.stat().st_size, "sha256": digest}
    return sums


def damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (naming the first bad file), or None when all are intact.

    The answer is remembered while no file of the checkpoint changes (name, size and modification time), so that
    checking a checkpoint before the models load and again when the loop resumes reads its files once. A checkpoint
    written before checksums existed has nothing to compare against: None (`find_checkpoint` warns of it).
    """
    if not (path / CHECKSUMS_FILE).is_file():
        return None
    stats = tuple(
        (p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()
    )
    return _damage(path, stats)


@functools.lru_cache(maxsize=8)
def _damage(path: Path, stats: tuple) -> str | None:
    try:
        expected = json.loads((path / CHECKSUMS_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{path / CHECKSUMS_FILE} cannot be read ({error})"
    for name, want in expected.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != want["size"]:
            return f"{file} has {file.stat().st_size} bytes where {want['size']} were written (truncated?)"
        with file.open("rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() != want["sha256"]:
                return f"{file} does not match the checksum written with it (corrupted)"
    return None


def read_state(path: Path) -> dict[str, Any]:
    """The loop's state stored in a checkpoint (`trainer_state.json`)."""
    return json.loads((path / STATE_FILE).read_text())


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (`checkpoint-N`), oldest first."""
    return [path for path in numbered_folders(output_dir) if is_complete(path)]


def numbered_folders(output_dir: str | Path) -> list[Path]:
    """Every `checkpoint-N` folder, complete or not, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name), p) for p in folder.iterdir() if p.is_dir()]
    return [path for _, path in sorted((int(m.group(1)), p) for m, p in found if m)]


def find_checkpoint(output_dir: str | Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: None; for 'latest', the newest intact one (a damaged or incomplete newer one is
    skipped with a warning; None if there is no checkpoint at all); or the given folder, which must be intact.

    Raises ConfigError naming the damaged file when the named checkpoint, or every checkpoint for 'latest', is
    damaged or incomplete.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        path = _newest_intact(output_dir)
    else:
        path = Path(resume_from_checkpoint)
        problem = _problem(path)
        if problem:
            raise ConfigError(
                f"--resume_from_checkpoint={str(path)!r} cannot be resumed: {problem}. Pass another "
                f"{CHECKPOINT_PREFIX}N folder, or 'latest' for the newest intact one."
            )
    if path is not None and not (path / CHECKSUMS_FILE).is_file():
        _warn_once(
            f"{path} has no {CHECKSUMS_FILE} (an earlier version wrote it): its files are not verified"
        )
    return path


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    """Log a warning once per process (the checkpoint is looked for before the models load and again to resume)."""
    logger.warning(message)


def _problem(path: Path) -> str | None:
    """Why the checkpoint `path` cannot be resumed (incomplete, or naming its damaged file), or None."""
    if not is_complete(path):
        return f"{path} is not a complete checkpoint (no {CHECKSUMS_FILE}, which is written last)"
    return damage(path)


def _newest_intact(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint whose files match their checksums; warns of each newer one it skips."""
    problems = []
    for path in reversed(numbered_folders(output_dir)):
        problem = _problem(path)
        if problem is None:
            if problems:
                _warn_once(f"--resume_from_checkpoint latest: resuming from {path}, the newest intact one")
            return path
        _warn_once(f"--resume_from_checkpoint latest: skipping {path.name}: {problem}")
        problems.append(problem)
    if problems:
        raise ConfigError(
            f"--resume_from_checkpoint latest: no intact checkpoint in {output_dir} ({'; '.join(problems)}). "
            "Pass --overwrite_output_dir to start again, or another --output_dir."
        )
    return None


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
        checksums = {"step": step, "files": file_checksums(tmp)}
        (tmp / CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=2) + "\n")
        if final.exists():  # the same step saved before (e.g. by a run that was resumed): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for path in rotate_checkpoints(output_dir, total_limit):
            logger.info("deleted old checkpoint %s (--checkpoints_total_limit %s)", path, total_limit)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, ema=None) -> tuple[dict[str, Any], bool]:
    """Restore what `save_checkpoint` wrote; returns (the loop's state, whether the EMA was restored).

    A file that cannot be read (its checksums were checked by `find_checkpoint`, so rather a checkpoint of another
    model) raises a RuntimeError naming the checkpoint.
    """
    ema_restored = ema is not None and (path / EMA_FILE).is_file()
    try:
        state = read_state(path)
        accelerator.load_state(str(path))
        if ema_restored:
            ema.load(path / EMA_FILE)
    except Exception as error:
        raise RuntimeError(f"could not restore checkpoint {path}: {type(error).__name__}: {error}") from error
    return state, ema_restored
