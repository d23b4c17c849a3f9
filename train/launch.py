"""The frame of every training script: the Accelerator, the frozen parts' dtype, trackers, and the run's end.

def main(argv=None) -> int:
    cfg = parse_config(argv, T2IConfig)
    accelerator = make_accelerator(cfg)
    ...
    return run_and_export(cfg, accelerator, trainer, task.export, seed)

if __name__ == "__main__":
    script_main(main)
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, is_tensorboard_available

from train.loop import NonFiniteLossError, Trainer
from train.loop_config import ConfigError, LoopConfig

logger = get_logger(__name__)


def make_accelerator(cfg: LoopConfig) -> Accelerator:
    """The Accelerator of a run: mixed precision, trackers, logging folder; CPU when no GPU is present.

    Gradient accumulation is done by the loop itself (so the accumulator's own counter is 1). On a machine without
    a GPU `cpu=True` is passed, which is what lets `torchrun --nproc_per_node N` start a real N-process gloo run;
    a launcher that asked for several processes but produced one is an error rather than a silent single run.
    fp16 on a CPU is refused (ConfigError) before anything starts.
    """
    use_cpu = not torch.cuda.is_available() and not (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    )
    check_mixed_precision(cfg, use_cpu)
    output_dir = Path(cfg.output_dir)
    log_with = None if cfg.report_to in (None, "none") else cfg.report_to
    if log_with == "tensorboard" and not is_tensorboard_available():
        warnings.warn(
            "--report_to tensorboard, but tensorboard is not installed: no tracker logs (pip install -e '.[train]', "
            "or pass --report_to none)",
            stacklevel=2,
        )
        log_with = None
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging_dir)
        ),
        cpu=use_cpu,
    )
    requested = int(os.environ.get("WORLD_SIZE", "1"))
    if requested > 1 and accelerator.num_processes != requested:
        raise RuntimeError(
            f"the launcher started {requested} processes (WORLD_SIZE={requested}) but accelerate sees "
            f"{accelerator.num_processes}: each process would train alone. Launch with `torchrun --nproc_per_node "
            f"{requested}` or an accelerate config whose distributed_type matches the machine."
        )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
    )
    for library in ("datasets", "transformers", "diffusers"):
        logging.getLogger(library).setLevel(logging.WARNING)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    logger.info(
        "accelerate: %d process(es), %s, device %s, mixed precision %s",
        accelerator.num_processes,
        accelerator.distributed_type,
        accelerator.device,
        accelerator.mixed_precision,
    )
    return accelerator


def check_mixed_precision(cfg: LoopConfig, use_cpu: bool) -> None:
    """Refuse fp16 on a CPU (float16 matrix products and the gradient scaler need a GPU): bf16 or no work there.

    The precision is --mixed_precision, else the accelerate config's (`accelerate launch` passes it in the
    environment as ACCELERATE_MIXED_PRECISION).
    """
    from_config = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if use_cpu and (cfg.mixed_precision or from_config) == "fp16":
        source = (
            "--mixed_precision fp16"
            if cfg.mixed_precision
            else "the accelerate config's mixed_precision: fp16"
        )
        raise ConfigError(
            f"{source} needs a GPU, and this machine has none: pass --mixed_precision bf16 (which CPUs support) or "
            "--mixed_precision no."
        )


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    """dtype of the frozen parts: half precision under mixed precision (they are only run forward)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def init_trackers(accelerator: Accelerator, cfg: LoopConfig) -> None:
    """Start the trackers with the run's config (lists and None written as strings, as TensorBoard needs)."""
    if cfg.report_to in (None, "none"):
        return
    flat = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in cfg.to_dict().items()}
    accelerator.init_trackers(cfg.tracker_project_name, config=flat)


def run_and_export(
    cfg: LoopConfig, accelerator: Accelerator, trainer: Trainer, export: Callable[[Trainer], Path], seed: int
) -> int:
    """The end of every training script: save the run's config, start the trackers, train, export.

    Returns the exit status: 0 when done, 1 when training stopped on a non-finite loss (the message names the step
    and the last good checkpoint; nothing is exported).
    """
    if accelerator.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / "train_config.yaml").write_text(
            yaml.safe_dump({**cfg.to_dict(), "seed": seed})
        )
    init_trackers(accelerator, cfg)
    try:
        result = trainer.train()
    except NonFiniteLossError:
        accelerator.end_training()
        return 1
    out = export(trainer)
    speed = (  # the first step (warm-up) is not timed: a 1-step run has no speed to report
        f"{result.images_per_second:.2f} images/s"
        if math.isfinite(result.images_per_second)
        else "speed not measured (too few steps)"
    )
    logger.info(
        "done: %d steps, %s, final loss %.4f; exported to %s",
        result.global_step,
        speed,
        result.last_loss,
        out,
    )
    accelerator.end_training()
    return 0


def script_main(main: Callable[[], int]) -> None:
    """Run a training script's `main`, turning a ConfigError into a one-line message and exit status 2."""
    try:
        sys.exit(main())
    except ConfigError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(2)
