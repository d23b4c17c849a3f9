"""The run's randomness: one seed, and every random number derived from it by name, never from global state.

- `derive_seed(seed, "epoch", e)`, `derive_seed(seed, "batch", step, micro)`, ...: a 63-bit seed per purpose, the
  same on every process, in every run and Python version.
- `BatchRandom`: the random numbers of one micro-batch (noise, timesteps, dropout), drawn for the whole global batch
  and sliced to this process's samples, so one process with batch 2 draws what two processes with batch 1 draw and
  a resumed run draws what the uninterrupted one would have: no random state needs saving.
- `resolve_seed`: the run's seed (given, stored in the checkpoint being resumed, or drawn once and broadcast).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list

from train.checkpoints import find_checkpoint, read_state

logger = get_logger(__name__)


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
        return int(read_state(checkpoint)["seed"])
    drawn = [secrets.randbits(31) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(drawn)
    logger.info("no --seed given: drew seed %d (stored in the checkpoints)", drawn[0])
    return int(drawn[0])


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
