"""The data of a run: the dataset read once and checked, split into training and held-out rows, and the order in which
the loop visits it.

Data order. Epoch e visits the samples in a permutation seeded by (seed, e); global batch k of the epoch is
positions [k·G, (k+1)·G) of it (G = per-process batch × processes) and process p reads its slice; the last incomplete
global batch of an epoch is dropped. Samples are fetched as `dataset[(epoch, index)]`, so per-sample augmentation can
be seeded by (seed, epoch, index). The data position is therefore a pure function of the number of micro-batches
seen: resuming at optimizer step s restarts at micro-batch s·A (A = accumulation steps), mid-epoch if need be, and
the same global batch gives the same samples with any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from latentdiff.data.dataset import (
    ImageTransform,
    TextImageDataset,
    check_columns,
    load_image_caption_dataset,
    without_image_decoding,
)
from train.loop_config import ConfigError, LoopConfig
from train.randomness import derive_seed


def load_data(cfg: LoopConfig):
    """The `datasets.Dataset` (images not decoded), columns checked, truncated to --max_train_samples."""
    dataset = load_image_caption_dataset(
        cfg.dataset_name, cfg.train_data_dir, cfg.dataset_config_name, cache_dir=cfg.cache_dir
    )
    try:
        check_columns(dataset, cfg.image_column, cfg.caption_column)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if cfg.max_train_samples is not None:
        dataset = dataset.select(range(min(cfg.max_train_samples, len(dataset))))
    if cfg.validation_holdout >= len(dataset):
        raise ConfigError(
            f"--validation_holdout={cfg.validation_holdout} leaves no training data: the dataset has "
            f"{len(dataset)} samples."
        )
    return without_image_decoding(dataset, cfg.image_column)


def split_image_datasets(
    cfg: LoopConfig, dataset, seed: int
) -> tuple[TextImageDataset, TextImageDataset | None]:
    """(training rows, the last --validation_holdout rows or None) as decoded, transformed `TextImageDataset`s;
    only the training part is flipped (--random_flip)."""
    transform = ImageTransform(cfg.resolution, cfg.center_crop)
    n_train = len(dataset) - cfg.validation_holdout

    def make(indices: range, flip: bool) -> TextImageDataset:
        return TextImageDataset(
            dataset.select(indices), cfg.image_column, cfg.caption_column, transform, flip, seed
        )

    holdout = make(range(n_train, len(dataset)), False) if cfg.validation_holdout else None
    return make(range(n_train), cfg.random_flip), holdout


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
