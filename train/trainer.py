"""The one training loop, shared by every training script (text-to-image, LoRA, VAE, CLIP).

A script builds its model and data, then hands the loop a `compute_loss(model, batch, rng) -> loss` hook:

    accelerator = make_accelerator(cfg)
    seed = resolve_seed(cfg, accelerator)
    ...build model, dataset, task...
    trainer = Trainer(cfg, accelerator, model, task.compute_loss, dataset, collate_fn, seed=seed,
                      validate=task.validate)
    result = trainer.train()

What the loop owns:
- Data order. Epoch e visits the samples in a permutation seeded by (seed, e); global batch k of the epoch is
  positions [k·G, (k+1)·G) of it (G = per-process batch × processes) and process p reads its slice; the last
  incomplete global batch of an epoch is dropped. Samples are fetched as `dataset[(epoch, index)]`, so per-sample
  augmentation can be seeded by (seed, epoch, index). The data position is therefore a pure function of the number of
  micro-batches seen: resuming at optimizer step s restarts at micro-batch s·A (A = accumulation steps), mid-epoch
  if need be, and the same global batch gives the same samples with any number of processes.
- Randomness of the loss. Each micro-batch gets a `BatchRandom`: a generator seeded by (seed, step, micro-batch),
  identical on every process, that draws values for the whole global batch and hands each process its slice. No
  random state needs restoring, and one process with batch 2 draws what two processes with batch 1 draw.
- Gradient accumulation (A micro-batches per optimizer step, gradients synchronised on the last one only),
  clipping, AdamW, the learning-rate schedule (stepped once per optimizer step, whatever the number of processes),
  mixed precision (through accelerate), an EMA of the trained weights.
- Checkpoints: `accelerator.save_state` (weights, optimizer, LR schedule, RNG states) plus `ema.safetensors` and
  `trainer_state.json`, written to `.tmp-checkpoint-N` and renamed to `checkpoint-N` once complete, so that a crash
  never leaves a partial checkpoint that `latest` would pick; rotation to `checkpoints_total_limit` on the main
  process. Resume restores all of it and continues at the exact next batch.
- A non-finite loss (or gradient norm) stops the run with `NonFiniteLossError` naming the step, before the weights
  are touched; the last checkpoint on disk stays as it was.
- Progress bar (loss, learning rate, images/s), tracker logs, and the count of unreadable samples the dataset
  reported through the batch's `skipped` list.

Nothing here knows about diffusion: that is the task's `compute_loss`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    is_tensorboard_available,
)
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) was NaN or infinite: training stopped before the weights were updated."""

    def __init__(self, message: str, step: int, last_checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


# ---- setup -----------------------------------------------------------------------------------------------------


def make_accelerator(cfg) -> Accelerator:
    """The Accelerator of a run: mixed precision, trackers, logging folder; CPU when no GPU is present.

    Gradient accumulation is done by the loop itself (so the accumulator's own counter is 1). On a machine without
    a GPU `cpu=True` is passed, which is what lets `torchrun --nproc_per_node N` start a real N-process gloo run;
    a launcher that asked for several processes but produced one is an error rather than a silent single run.
    """
    use_cpu = not torch.cuda.is_available() and not (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    )
    output_dir = Path(cfg.output_dir)
    log_with = None if cfg.report_to in (None, "none") else cfg.report_to
    if log_with == "tensorboard" and not is_tensorboard_available():
        warnings.warn(
            "--report_to tensorboard, but tensorboard is not installed: no tracker logs (pip install tensorboard, "
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
    if getattr(cfg, "allow_tf32", False) and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    logger.info(
        "accelerate: %d process(es), %s, device %s, mixed precision %s",
        accelerator.num_processes,
        accelerator.distributed_type,
        accelerator.device,
        accelerator.mixed_precision,
    )
    return accelerator


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple of values (stable across processes, runs and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def resolve_seed(cfg, accelerator: Accelerator) -> int:
    """The run's seed: `cfg.seed`, else the one stored in the checkpoint being resumed, else a fresh random one.

    The same value is returned on every process.
    """
    if cfg.seed is not None:
        return int(cfg.seed)
    checkpoint = find_checkpoint(cfg.output_dir, cfg.resume_from_checkpoint)
    if checkpoint is not None:
        return int(json.loads((checkpoint / STATE_FILE).read_text())["seed"])
    drawn = [secrets.randbits(31) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(drawn)
    logger.info("no --seed given: drew seed %d (stored in the checkpoints)", drawn[0])
    return int(drawn[0])


# ---- randomness and data order ---------------------------------------------------------------------------------


class BatchRandom:
    """The random numbers of one micro-batch: the same on every process, sliced to this process's samples.

    Every draw makes values for the whole global batch (G samples) from a generator seeded by
    (seed, step, micro_step), then keeps rows [offset, offset + local_batch), so the numbers a sample gets do not
    depend on how many processes share the batch. Draws happen on the CPU, then move to `device`.
    """

    def __init__(
        self,
        seed: int,
        step: int,
        micro_step: int,
        global_batch: int,
        offset: int,
        local_batch: int,
        device: torch.device,
    ) -> None:
        self.generator = torch.Generator().manual_seed(derive_seed(seed, "batch", step, micro_step))
        self.global_batch = global_batch
        self.offset = offset
        self.local_batch = local_batch
        self.device = device

    def _local(self, values: torch.Tensor) -> torch.Tensor:
        return values[self.offset : self.offset + self.local_batch].to(self.device)

    def randn(self, *shape: int) -> torch.Tensor:
        """(local_batch, *shape) standard normal float32."""
        return self._local(torch.randn(self.global_batch, *shape, generator=self.generator))

    def rand(self, *shape: int) -> torch.Tensor:
        """(local_batch, *shape) uniform in [0, 1), float32."""
        return self._local(torch.rand(self.global_batch, *shape, generator=self.generator))

    def randint(self, low: int, high: int) -> torch.Tensor:
        """(local_batch,) integers in [low, high)."""
        return self._local(torch.randint(low, high, (self.global_batch,), generator=self.generator))


class EpochBatchSampler(torch.utils.data.Sampler):
    """This process's part of every global batch, forever, from micro-batch `start` on.

    Yields lists of `(epoch, index)` keys. Epoch e's order is a permutation seeded by (seed, e); see the module
    docstring. `batches_per_epoch` = dataset_size // global batch (the remainder is dropped).
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        num_processes: int,
        process_index: int,
        seed: int,
        start: int = 0,
    ) -> None:
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.global_batch = batch_size * num_processes
        self.offset = batch_size * process_index
        self.seed = seed
        self.start = start
        self.batches_per_epoch = dataset_size // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {dataset_size} samples, fewer than one global batch of {self.global_batch} "
                f"(--train_batch_size {batch_size} x {num_processes} processes); lower --train_batch_size."
            )

    def position(self, micro_batch: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a micro-batch counter."""
        return divmod(micro_batch, self.batches_per_epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro_batch, order, order_epoch = self.start, None, None
        while True:
            epoch, batch = self.position(micro_batch)
            if order_epoch != epoch:
                order, order_epoch = self.permutation(epoch), epoch
            first = batch * self.global_batch + self.offset
            yield [(epoch, int(i)) for i in order[first : first + self.batch_size]]
            micro_batch += 1


# ---- EMA ---------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the trainable parameters (float32 copies).

    θ̄ ← d_n·θ̄ + (1 − d_n)·θ at update n = 0, 1, …, with d_0 = 0 (the first update copies θ) and
    d_n = min(decay, (1 + n)/(10 + n)) afterwards: diffusers' `EMAModel` schedule without its power warm-up, so a
    young average follows the weights instead of staying at their random start.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = {
            name: p.detach().to(torch.float32).clone()
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    def current_decay(self) -> float:
        n = self.num_updates
        return 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().to(torch.float32), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model`'s parameters (cast to their dtype)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Use the averaged weights inside the block, the trained ones again after it."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in backup:
                        p.copy_(backup[name])

    def save(self, path: Path) -> None:
        save_file(
            {name: t.contiguous() for name, t in self.shadow.items()},
            str(path),
            metadata={"num_updates": str(self.num_updates), "decay": repr(self.decay)},
        )

    def load(self, path: Path) -> None:
        from safetensors import safe_open

        tensors = load_file(str(path))
        missing = sorted(set(self.shadow) - set(tensors))
        if missing:
            raise ValueError(f"{path} lacks EMA weights for {len(missing)} parameters, e.g. {missing[:3]}")
        for name in self.shadow:
            self.shadow[name] = tensors[name].to(self.shadow[name].device)
        with safe_open(str(path), framework="pt") as f:
            self.num_updates = int(f.metadata()["num_updates"])


# ---- checkpoints -------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (`checkpoint-N` with a trainer_state.json), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and (path / STATE_FILE).is_file():
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
    if not (path / STATE_FILE).is_file():
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


# ---- the loop ----------------------------------------------------------------------------------------------------


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
        cfg: a `TrainConfig` (or subclass): the loop reads the batch, step, optimiser, schedule, EMA, checkpoint and
            validation fields.
        accelerator: from `make_accelerator`.
        model: the module to train (its parameters with requires_grad are optimised and averaged; for several
            parts, an nn.ModuleDict). Moved to the accelerator's device.
        compute_loss: `compute_loss(model, batch, rng: BatchRandom) -> scalar loss` (mean over the local batch). It
            receives `model` (not a data-parallel wrapper), and must draw all its randomness from `rng`.
        dataset: a map-style dataset indexed by `(epoch, index)` keys.
        collate_fn: list of items -> batch dict. A `skipped` list in the batch (unreadable samples) is counted.
        seed: from `resolve_seed`.
        validate: optional `validate(trainer, step) -> dict of scalars to log`, called on every process every
            `cfg.validation_steps` optimizer steps and at the end.
    """

    def __init__(
        self,
        cfg,
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
        accumulation = cfg.gradient_accumulation_steps
        self.max_train_steps = cfg.max_train_steps or math.ceil(
            cfg.num_train_epochs * self.batches_per_epoch / accumulation
        )

        learning_rate = cfg.learning_rate
        if cfg.scale_lr:
            learning_rate *= self.global_batch * accumulation
        params = [p for _, p in trainable]
        optimizer = torch.optim.AdamW(
            params,
            lr=learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        from diffusers.optimization import get_scheduler

        # Stepped by the loop once per optimizer step (not prepared by accelerate, which would step it once per
        # process), so warm-up and decay are counted in optimizer steps whatever the number of processes.
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=self.max_train_steps,
        )
        self.loss_module, self.optimizer = accelerator.prepare(_LossModule(model, compute_loss), optimizer)
        accelerator.register_for_checkpointing(self.lr_scheduler)
        self.trainable_parameters = params
        self.ema = EMA(model, cfg.ema_decay) if cfg.use_ema else None

    # ---- state -------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[nn.Module]:
        """The model with the EMA weights inside the block (the trained weights when EMA is off)."""
        if self.ema is None:
            yield self.model
        else:
            with self.ema.swapped_into(self.model) as model:
                yield model

    def save_checkpoint(self) -> Path:
        """Write `checkpoint-<step>` atomically (all processes call this); returns its path."""
        accelerator, step = self.accelerator, self.global_step
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.output_dir / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            if self.ema is not None:
                self.ema.save(tmp / EMA_FILE)
            epoch, batch = self.sampler.position(step * self.cfg.gradient_accumulation_steps)
            state = {
                "global_step": step,
                "epoch": epoch,
                "batch_in_epoch": batch,
                "micro_batches_seen": step * self.cfg.gradient_accumulation_steps,
                "seed": self.seed,
                "num_processes": accelerator.num_processes,
                "train_batch_size": self.cfg.train_batch_size,
                "global_batch_size": self.global_batch,
                "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
                "dataset_size": len(self.dataset),
                "max_train_steps": self.max_train_steps,
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.exists():  # the same step saved before (e.g. by a run that was resumed): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            for path in rotate_checkpoints(self.output_dir, self.cfg.checkpoints_total_limit):
                logger.info(
                    "deleted old checkpoint %s (--checkpoints_total_limit %s)",
                    path,
                    self.cfg.checkpoints_total_limit,
                )
            logger.info("saved checkpoint %s", final)
        accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, LR schedule, RNG states, EMA and the step (hence the data position)."""
        state = json.loads((path / STATE_FILE).read_text())
        self.accelerator.load_state(str(path))
        if self.ema is not None:
            if (path / EMA_FILE).is_file():
                self.ema.load(path / EMA_FILE)
            else:
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
        cfg, accelerator = self.cfg, self.accelerator
        accumulation = cfg.gradient_accumulation_steps
        last_checkpoint = None
        if accelerator.is_main_process:
            for stale in self.output_dir.glob(f"{TMP_PREFIX}{CHECKPOINT_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)  # left by a crash during a save
        resume = find_checkpoint(self.output_dir, cfg.resume_from_checkpoint)
        if resume is not None:
            self.load_checkpoint(resume)
            last_checkpoint = resume
        elif cfg.resume_from_checkpoint == "latest":
            logger.info(
                "--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run",
                self.output_dir,
            )
        start_step = self.global_step
        self.sampler.start = start_step * accumulation
        epoch, batch = self.sampler.position(self.sampler.start)
        logger.info(
            "training: %d samples, %d batches of %d per epoch (%d per process x %d processes), %d accumulation "
            "steps, %d optimizer steps%s",
            len(self.dataset),
            self.batches_per_epoch,
            self.global_batch,
            cfg.train_batch_size,
            accelerator.num_processes,
            accumulation,
            self.max_train_steps,
            f"; resumed from {resume} at step {start_step} (epoch {epoch}, batch {batch})" if resume else "",
        )
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collate_fn,
            num_workers=cfg.dataloader_num_workers,
            pin_memory=accelerator.device.type == "cuda",
        )
        batches = iter(loader)
        progress = tqdm(
            total=self.max_train_steps,
            initial=start_step,
            desc="steps",
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        losses: list[float] = []
        unreadable: set[int] = set()
        timed_images, timed_seconds = 0, 0.0
        saved_at, validated_at = start_step if resume else -1, -1
        for step in range(start_step, self.max_train_steps):
            tick = time.perf_counter()
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
            seconds = time.perf_counter() - tick
            if step > start_step:  # the first step pays for warm-up
                timed_images += self.global_batch * accumulation
                timed_seconds += seconds
            losses.append(float(step_loss))
            lr = self.lr_scheduler.get_last_lr()[0]
            images_per_second = self.global_batch * accumulation / max(seconds, 1e-9)
            progress.update(1)
            progress.set_postfix(
                loss=f"{float(step_loss):.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.1f}"
            )
            accelerator.log(
                {
                    "train_loss": float(step_loss),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "images_per_second": images_per_second,
                },
                step=self.global_step,
            )
            if cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0:
                last_checkpoint, saved_at = self.save_checkpoint(), self.global_step
            if (
                self.validate is not None
                and cfg.validation_steps
                and self.global_step % cfg.validation_steps == 0
            ):
                self._run_validation()
                validated_at = self.global_step
        progress.close()
        if cfg.checkpointing_steps and saved_at != self.global_step:
            last_checkpoint = self.save_checkpoint()
        if self.validate is not None and validated_at != self.global_step:
            self._run_validation()
        unreadable_all = sorted({i for part in gather_object([sorted(unreadable)]) for i in part})
        if unreadable_all:
            logger.warning(
                "%d unreadable sample(s) were skipped (each replaced by the next readable one): indices %s",
                len(unreadable_all),
                unreadable_all[:20],
            )
        else:
            logger.info("no unreadable samples")
        return TrainResult(
            global_step=self.global_step,
            images_per_second=timed_images / timed_seconds if timed_seconds > 0 else float("nan"),
            last_loss=losses[-1] if losses else float("nan"),
            losses=losses,
            last_checkpoint=last_checkpoint,
            unreadable_samples=unreadable_all,
        )

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
        epoch, batch = self.sampler.position(self.global_step * self.cfg.gradient_accumulation_steps)
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


def init_trackers(accelerator: Accelerator, cfg) -> None:
    """Start the trackers with the run's config (lists and None written as strings, as TensorBoard needs)."""
    if cfg.report_to in (None, "none"):
        return
    flat = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in cfg.to_dict().items()}
    accelerator.init_trackers(cfg.tracker_project_name, config=flat)


def run_and_export(
    cfg, accelerator: Accelerator, trainer: Trainer, export: Callable[[Trainer], Path], seed: int
) -> int:
    """The end of every training script: save the run's config, start the trackers, train, export.

    Returns the exit status: 0 when done, 1 when training stopped on a non-finite loss (the message names the step
    and the last good checkpoint; nothing is exported).
    """
    import yaml

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
    logger.info(
        "done: %d steps, %.2f images/s, final loss %.4f; exported to %s",
        result.global_step,
        result.images_per_second,
        result.last_loss,
        out,
    )
    accelerator.end_training()
    return 0


def script_main(main: Callable[[], int]) -> None:
    """Run a training script's `main`, turning a ConfigError into a one-line message and exit status 2."""
    import sys

    from config import ConfigError

    try:
        sys.exit(main())
    except ConfigError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(2)
