"""The run's --output_dir: never train over an earlier run by accident, and start clean when asked to.

An --output_dir that already holds files is refused unless the command says what to do with them:

    --resume_from_checkpoint latest | checkpoint-N    continue the earlier run
    --overwrite_output_dir                            delete the earlier run and start again (transformers' flag)

`--overwrite_output_dir` deletes only what a training run writes there: the checkpoints (`checkpoint-N`,
`.tmp-checkpoint-N`), `train_config.yaml`, the logging folder, `validation/` and the task's export (each task's
config lists it in `EXPORTED`). A cache a run can reuse (`CACHES`, e.g. `latent_cache/`, keyed by what produced it)
is kept. Anything else (a file no training run writes) is never deleted: the command refuses and names it. It also
refuses a folder without `train_config.yaml`, which every run writes first: a model folder (e.g. the base model's
own, with its `unet/` and `model_index.json`) has the export's names but is no run's.

`--resume_from_checkpoint latest` in a folder without any checkpoint starts a new run only when the folder holds no
more than a run leaves before its first checkpoint; a finished run's export without checkpoints is refused as well.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

from train.checkpoints import CHECKPOINT_PREFIX, TMP_PREFIX, find_checkpoint, numbered_folders
from train.loop_config import ConfigError, LoopConfig

logger = get_logger(__name__)

RUN_CONFIG_FILE = "train_config.yaml"  # written by `train.launch.run_and_export`
VALIDATION_FOLDER = "validation"  # the tasks' validation images
CHECKPOINT_NAME = re.compile(rf"({re.escape(TMP_PREFIX)})?{CHECKPOINT_PREFIX}\d+")


def _logging_folder(cfg: LoopConfig) -> str | None:
    """The top-level name of --logging_dir inside --output_dir (None when it lies elsewhere)."""
    parts = Path(cfg.logging_dir).parts
    return parts[0] if parts and not Path(cfg.logging_dir).is_absolute() and parts[0] != ".." else None


def _before_first_checkpoint(cfg: LoopConfig) -> set[str]:
    """What a run writes before its first checkpoint (a new run rewrites it), caches included."""
    return {RUN_CONFIG_FILE, VALIDATION_FOLDER, _logging_folder(cfg), *type(cfg).CACHES} - {None}


def _written_by_a_run(cfg: LoopConfig, name: str) -> bool:
    """Whether a top-level entry of --output_dir is something a run of this task writes (caches excluded)."""
    run_names = (_before_first_checkpoint(cfg) - set(type(cfg).CACHES)) | set(type(cfg).EXPORTED)
    return bool(CHECKPOINT_NAME.fullmatch(name)) or name in run_names


def _names(paths: list[Path], limit: int = 6) -> str:
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_output_dir(cfg: LoopConfig) -> list[Path]:
    """Refuse (ConfigError) an --output_dir this run would damage; returns what --overwrite_output_dir deletes.

    Reads only: nothing is deleted here (see `prepare_output_dir`).
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--output_dir={str(out)!r} is a file; pass a folder (a new one, or an earlier run's)."
        )
    entries = sorted(out.iterdir()) if out.is_dir() else []
    caches = [p for p in entries if p.name in type(cfg).CACHES]
    if len(entries) == len(caches):  # empty, or a cache only: any run may use it
        return []
    written = [p for p in entries if _written_by_a_run(cfg, p.name)]
    foreign = [p for p in entries if p not in written and p not in caches]
    task = type(cfg).__name__
    if cfg.overwrite_output_dir:
        if foreign:
            raise ConfigError(
                f"--overwrite_output_dir deletes only what a training run writes, and --output_dir={str(out)!r} "
                f"also holds {_names(foreign)}, which no {task} run writes: move them away, or pass another "
                "--output_dir. Nothing was deleted."
            )
        if not (out / RUN_CONFIG_FILE).is_file():
            raise ConfigError(
                f"--overwrite_output_dir deletes only a training run's files, and --output_dir={str(out)!r} has no "
                f"{RUN_CONFIG_FILE} (every run writes one first), so {_names(written)} may not be a run's (a model "
                "folder has the same names): delete them yourself if they are, or pass another --output_dir. "
                "Nothing was deleted."
            )
        resume = cfg.resume_from_checkpoint
        if resume not in (None, "latest") and out.resolve() in Path(resume).resolve().parents:
            raise ConfigError(
                f"--overwrite_output_dir would delete --resume_from_checkpoint={resume!r}: pass one of the two."
            )
        return written
    if cfg.resume_from_checkpoint is None:
        fixes = [
            "--resume_from_checkpoint latest to continue the earlier run" if numbered_folders(out) else None,
            "--overwrite_output_dir to delete it and start again" if written and not foreign else None,
            "a new --output_dir",
        ]
        raise ConfigError(
            f"--output_dir={str(out)!r} already holds {_names(entries)}, which this run would overwrite: pass "
            f"{', or '.join(f for f in fixes if f)}."
        )
    if cfg.resume_from_checkpoint == "latest" and not numbered_folders(out):
        leftover = [
            p
            for p in entries
            if p.name not in _before_first_checkpoint(cfg) and not p.name.startswith(TMP_PREFIX)
        ]
        if leftover:
            raise ConfigError(
                f"--resume_from_checkpoint latest: --output_dir={str(out)!r} has no checkpoint to resume, but holds "
                f"{_names(leftover)}, which a new run would overwrite: pass --overwrite_output_dir to delete the "
                "earlier run and start again, or a new --output_dir."
            )
    return []


def prepare_output_dir(cfg: LoopConfig, accelerator: Accelerator) -> None:
    """Check --output_dir and the checkpoint to resume on every process, then, with --overwrite_output_dir, delete the
    earlier run's files (main process). Call it right after `make_accelerator`, before anything is written."""
    doomed = check_output_dir(cfg)
    if not (cfg.overwrite_output_dir and cfg.resume_from_checkpoint == "latest"):
        # a damaged checkpoint to resume is refused here, before the models load and anything is written
        find_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
    accelerator.wait_for_everyone()
    if doomed and accelerator.is_main_process:
        for path in doomed:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()  # a file, or a link (never what it points to)
        logger.warning(
            "--overwrite_output_dir: deleted the earlier run's %s from %s", _names(doomed, 20), cfg.output_dir
        )
    accelerator.wait_for_everyone()
