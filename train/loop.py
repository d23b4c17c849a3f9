"""The one training loop, shared by every training script (text-to-image, LoRA, VAE, CLIP, and those to come).

A script builds its model and data, then hands the loop a `compute_loss(model, batch, rng) -> loss` hook:

    trainer = Trainer(cfg, accelerator, model, task.compute_loss, dataset, collate_fn, seed=seed,
                      validate=task.validate)
    result = trainer.train()

What the loop owns: the data order (`train.data.EpochBatchSampler`), the randomness of each micro-batch
(`train.randomness.BatchRandom`), gradient accumulation (gradients synchronised on the last micro-batch only),
clipping, AdamW, the learning-rate schedule (stepped once per optimizer step, whatever the number of processes),
mixed precision (through accelerate), the EMA (`train.ema`), checkpoints and exact resume (`train.checkpoints`), and
the validation schedule. A non-finite loss (or gradient norm) stops the run with `NonFiniteLossError` naming the
step, before the weights are touched; the last checkpoint on disk stays as it was. It shows a progress bar (loss,
learning rate, images/s), logs to the trackers, and counts the unreadable samples the dataset reported through the
batch's `skipped` list.

Nothing here knows about diffusion: that is the task's `compute_loss`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from train import checkpoints
from train.data import EpochBatchSampler
from train.ema import EMA
from train.loop_config import LoopConfig
from train.randomness import BatchRandom

logger = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) was NaN or infinite: training stopped before the weights were updated."""

    def __init__(self, message: str, step: int, last_checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


class _LossModule(nn.Module):
    """The trained module plus the loss hook, so that data-parallel wrapping sees one forward that returns the loss."""

    def __init__(self, model: nn.Module, compute_loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.compute_loss = compute_loss  # a plain attribute: the task's frozen parts are not registered here

    def forward(self, batch: dict[str, Any], rng: BatchRandom) -> torch.Tensor:
        return self.compute_loss(self.model, batch, rng)


@dataclass
class TrainResult:
    """What a run did. images_per_second counts global samples over training steps only (no checkpoint or
    validation time), excluding the first step (warm-up)."""

    global_step: int
    images_per_second: float
    last_loss: float
    losses: list[float] = field(default_factory=list)
    last_checkpoint: Path | None = None
    unreadable_samples: list[int] = field(default_factory=list)


class Trainer:
    """Runs `compute_loss` over the data with everything the module docstring lists.

    Args:
        cfg: a `LoopConfig` (or a task's subclass): the loop reads its batch, step, optimiser, schedule, EMA,
            checkpoint and validation fields.
        accelerator: from `train.launch.make_accelerator`.
        model: the module to train (its parameters with requires_grad are optimised and averaged; for several
            parts, an nn.ModuleDict). Moved to the accelerator's device.
        compute_loss: `compute_loss(model, batch, rng: BatchRandom) -> scalar loss` (mean over the local batch). It
            receives `model` (not a data-parallel wrapper), and must draw all its randomness from `rng`.
        dataset: a map-style dataset indexed by `(epoch, index)` keys.
        collate_fn: list of items -> batch dict. A `skipped` list in the batch (unreadable samples) is counted.
        seed: from `train.randomness.resolve_seed`.
        validate: optional `validate(trainer, step) -> dict of scalars to log`, called on every process every
            `cfg.validation_steps` optimizer steps, every `cfg.validation_epochs` epochs, and at the end.
    """

    def __init__(
        self,
        cfg: LoopConfig,
        accelerator: Accelerator,
        model: nn.Module,
        compute_loss: Callable[[nn.Module, dict[str, Any], BatchRandom], torch.Tensor],
        dataset: torch.utils.data.Dataset,
        collate_fn: Callable[[list[Any]], dict[str, Any]],
        seed: int,
        validate: Callable[[Trainer, int], dict[str, float]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.model = model
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.seed = seed
        self.validate = validate
        self.output_dir = Path(cfg.output_dir)
        self.global_step = 0

        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
        half = [name for name, p in trainable if p.dtype == torch.float16]
        if half:
            raise ValueError(
                f"trainable parameters must be float32 (mixed precision casts the computation, not the weights): "
                f"{half[:3]} are float16. Cast them with .float() before training."
            )
        self.sampler = EpochBatchSampler(
            len(dataset), cfg.train_batch_size, accelerator.num_processes, accelerator.process_index, seed
        )
        self.batches_per_epoch = self.sampler.batches_per_epoch
        self.global_batch = self.sampler.global_batch
        self.max_train_steps = cfg.max_train_steps or math.ceil(
            cfg.num_train_epochs * self.batches_per_epoch / cfg.gradient_accumulation_steps
        )
        self.trainable_parameters = [p for _, p in trainable]
        optimizer, self.lr_scheduler = self._optimizer_and_schedule()
        self.loss_module, self.optimizer = accelerator.prepare(_LossModule(model, compute_loss), optimizer)
        accelerator.register_for_checkpointing(self.lr_scheduler)
        self.ema = EMA(model, cfg.ema_decay) if cfg.use_ema else None

    def _optimizer_and_schedule(self) -> tuple[torch.optim.Optimizer, Any]:
        from diffusers.optimization import get_scheduler

        cfg = self.cfg
        learning_rate = cfg.learning_rate
        if cfg.scale_lr:
            learning_rate *= self.global_batch * cfg.gradient_accumulation_steps
        optimizer = torch.optim.AdamW(
            self.trainable_parameters,
            lr=learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        # Stepped by the loop once per optimizer step (not prepared by accelerate, which would step it once per
        # process), so warm-up and decay are counted in optimizer steps whatever the number of processes.
        schedule = get_scheduler(
            cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=self.max_train_steps,
        )
        return optimizer, schedule

    # ---- state -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[nn.Module]:
        """The model with the EMA weights inside the block (the trained weights when EMA is off)."""
        if self.ema is None:
            yield self.model
        else:
            with self.ema.swapped_into(self.model) as model:
                yield model

    def micro_batches_seen(self) -> int:
        return self.global_step * self.cfg.gradient_accumulation_steps

    def save_checkpoint(self) -> Path:
        """Write `checkpoint-<step>` atomically (all processes call this); returns its path."""
        epoch, batch = self.sampler.position(self.micro_batches_seen())
        state = {
            "global_step": self.global_step,
            "epoch": epoch,
            "batch_in_epoch": batch,
            "micro_batches_seen": self.micro_batches_seen(),
            "seed": self.seed,
            "num_processes": self.accelerator.num_processes,
            "train_batch_size": self.cfg.train_batch_size,
            "global_batch_size": self.global_batch,
            "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
            "dataset_size": len(self.dataset),
            "max_train_steps": self.max_train_steps,
        }
        return checkpoints.save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.global_step,
            state,
            self.ema,
            self.cfg.checkpoints_total_limit,
        )

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, LR schedule, RNG states, EMA and the step (hence the data position)."""
        state, ema_restored = checkpoints.load_checkpoint(self.accelerator, path, self.ema)
        if self.ema is not None and not ema_restored:
            logger.warning("%s has no EMA weights: the average restarts from the current weights", path)
            self.ema = EMA(self.model, self.cfg.ema_decay)
        self.global_step = int(state["global_step"])
        for key, now in (
            ("global_batch_size", self.global_batch),
            ("gradient_accumulation_steps", self.cfg.gradient_accumulation_steps),
            ("dataset_size", len(self.dataset)),
        ):
            if state.get(key) != now:
                logger.warning(
                    "resuming with %s=%s where the checkpoint had %s: the data order will not continue exactly",
                    key,
                    now,
                    state.get(key),
                )
        if state.get("seed") != self.seed:
            logger.warning("resuming with seed %s where the checkpoint had %s", self.seed, state.get("seed"))

    # ---- training ----------------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Train from scratch or from the checkpoint `cfg.resume_from_checkpoint` names, up to max_train_steps."""
        cfg = self.cfg
        last_checkpoint = self._resume()
        start_step = self.global_step
        batches = iter(self._dataloader())
        progress = tqdm(
            total=self.max_train_steps,
            initial=start_step,
            desc="steps",
            disable=not self.accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        losses: list[float] = []
        unreadable: set[int] = set()
        timed_images, timed_seconds = 0, 0.0
        saved_at, validated_at = start_step if last_checkpoint else -1, -1
        for step in range(start_step, self.max_train_steps):
            tick = time.perf_counter()
            loss, grad_norm = self._optimizer_step(step, batches, unreadable, last_checkpoint)
            seconds = time.perf_counter() - tick
            if step > start_step:  # the first step pays for warm-up
                timed_images += self.global_batch * cfg.gradient_accumulation_steps
                timed_seconds += seconds
            losses.append(loss)
            self._log_step(progress, loss, grad_norm, seconds)
            if cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0:
                last_checkpoint, saved_at = self.save_checkpoint(), self.global_step
            if self.validate is not None and self._validation_due():
                self._run_validation()
                validated_at = self.global_step
        progress.close()
        if cfg.checkpointing_steps and saved_at != self.global_step:
            last_checkpoint = self.save_checkpoint()
        if self.validate is not None and validated_at != self.global_step:
            self._run_validation()
        return TrainResult(
            global_step=self.global_step,
            images_per_second=timed_images / timed_seconds if timed_seconds > 0 else float("nan"),
            last_loss=losses[-1] if losses else float("nan"),
            losses=losses,
            last_checkpoint=last_checkpoint,
            unreadable_samples=self._report_unreadable(unreadable),
        )

    def _resume(self) -> Path | None:
        """Load the checkpoint to resume from, if any, and place the data order there; returns its path."""
        if self.accelerator.is_main_process:
            checkpoints.remove_partial_checkpoints(self.output_dir)
        resume = checkpoints.find_checkpoint(self.output_dir, self.cfg.resume_from_checkpoint)
        if resume is not None:
            self.load_checkpoint(resume)
        elif self.cfg.resume_from_checkpoint == "latest":
            logger.info(
                "--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run",
                self.output_dir,
            )
        self.sampler.start = self.micro_batches_seen()
        epoch, batch = self.sampler.position(self.sampler.start)
        logger.info(
            "training: %d samples, %d batches of %d per epoch (%d per process x %d processes), %d accumulation "
            "steps, %d optimizer steps%s",
            len(self.dataset),
            self.batches_per_epoch,
            self.global_batch,
            self.cfg.train_batch_size,
            self.accelerator.num_processes,
            self.cfg.gradient_accumulation_steps,
            self.max_train_steps,
            f"; resumed from {resume} at step {self.global_step} (epoch {epoch}, batch {batch})"
            if resume
            else "",
        )
        return resume

    def _dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collate_fn,
            num_workers=self.cfg.dataloader_num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
        )

    def _optimizer_step(
        self, step: int, batches: Iterator, unreadable: set[int], last_checkpoint: Path | None
    ) -> tuple[float, torch.Tensor]:
        """One optimizer step over A micro-batches; returns (the loss averaged over processes, gradient norm)."""
        cfg, accelerator = self.cfg, self.accelerator
        accumulation = cfg.gradient_accumulation_steps
        total = torch.zeros((), device=accelerator.device)
        for micro in range(accumulation):
            batch = next(batches)
            unreadable.update(batch.pop("skipped", []))
            rng = BatchRandom(
                self.seed,
                step,
                micro,
                self.global_batch,
                self.sampler.offset,
                cfg.train_batch_size,
                accelerator.device,
            )
            last = micro == accumulation - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(self.loss_module):
                loss = self.loss_module(batch, rng)
                accelerator.backward(loss / accumulation)
            total += loss.detach().float() / accumulation
        step_loss = accelerator.gather(total[None]).mean()
        grad_norm = accelerator.clip_grad_norm_(
            self.trainable_parameters, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        )
        self._check_finite(step + 1, step_loss, grad_norm, last_checkpoint)
        self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step = step + 1
        return float(step_loss), grad_norm

    def _log_step(self, progress: tqdm, loss: float, grad_norm: torch.Tensor, seconds: float) -> None:
        lr = self.lr_scheduler.get_last_lr()[0]
        images_per_second = self.global_batch * self.cfg.gradient_accumulation_steps / max(seconds, 1e-9)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.1f}")
        self.accelerator.log(
            {
                "train_loss": loss,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "images_per_second": images_per_second,
            },
            step=self.global_step,
        )

    def _validation_due(self) -> bool:
        """Every --validation_steps optimizer steps, and when an epoch that --validation_epochs divides ends."""
        cfg = self.cfg
        if cfg.validation_steps and self.global_step % cfg.validation_steps == 0:
            return True
        if not cfg.validation_epochs:
            return False
        epochs_done = self.micro_batches_seen() // self.batches_per_epoch
        before = (self.micro_batches_seen() - cfg.gradient_accumulation_steps) // self.batches_per_epoch
        return epochs_done > before and epochs_done % cfg.validation_epochs == 0

    def _report_unreadable(self, unreadable: set[int]) -> list[int]:
        everywhere = sorted({i for part in gather_object([sorted(unreadable)]) for i in part})
        if everywhere:
            logger.warning(
                "%d unreadable sample(s) were skipped (each replaced by the next readable one): indices %s",
                len(everywhere),
                everywhere[:20],
            )
        else:
            logger.info("no unreadable samples")
        return everywhere

    def _check_finite(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, last_checkpoint: Path | None
    ) -> None:
        grad_ok = (
            bool(torch.isfinite(grad_norm)) or self.accelerator.scaler is not None
        )  # fp16: the scaler skips
        if bool(torch.isfinite(loss)) and grad_ok:
            return
        what = (
            f"loss is {float(loss)}" if not torch.isfinite(loss) else f"gradient norm is {float(grad_norm)}"
        )
        epoch, batch = self.sampler.position(self.micro_batches_seen())
        where = (
            f"the last good checkpoint is {last_checkpoint} (resume with --resume_from_checkpoint latest, perhaps "
            "with a lower --learning_rate)"
            if last_checkpoint
            else "no checkpoint was written yet"
        )
        message = (
            f"non-finite training: {what} at step {step} (epoch {epoch}, batch {batch}); stopped before updating "
            f"the weights; {where}."
        )
        logger.error(message)
        raise NonFiniteLossError(message, step, last_checkpoint)

    def _run_validation(self) -> None:
        logs = self.validate(self, self.global_step) or {}
        if logs:
            self.accelerator.log(logs, step=self.global_step)
            logger.info(
                "validation at step %d: %s",
                self.global_step,
                ", ".join(f"{k}={v:.4g}" for k, v in logs.items()),
            )
