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
from pathlib import Path

import torch
from accelerate.logging import get_logger

from latentdiff.data.dataset import (
    ImageTransform,
    TextImageDataset,
    captions_of,
    check_columns,
    load_image_caption_dataset,
    without_image_decoding,
)
from train.loop_config import ConfigError, LoopConfig
from train.randomness import derive_seed

logger = get_logger(__name__)

IMAGEFOLDER_LAYOUT = (
    'images plus a metadata.jsonl with one {"file_name": "0001.png", "text": "a caption"} line each'
)
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # what datasets' imagefolder reads


def load_data(cfg: LoopConfig):
    """The `datasets.Dataset` (images not decoded), columns and captions checked, truncated to --max_train_samples."""
    dataset = read_dataset(cfg)
    if cfg.max_train_samples is not None:
        dataset = dataset.select(range(min(cfg.max_train_samples, len(dataset))))
    if type(cfg).USES_CAPTIONS and cfg.caption_column in dataset.column_names:
        count_missing_captions(dataset, cfg)
    try:
        check_columns(dataset, cfg.image_column, cfg.caption_column)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if cfg.validation_holdout >= len(dataset):
        raise ConfigError(
            f"--validation_holdout={cfg.validation_holdout} leaves no training data: the dataset has "
            f"{len(dataset)} samples."
        )
    return without_image_decoding(dataset, cfg.image_column)


def read_dataset(cfg: LoopConfig):
    """The dataset of --train_data_dir or --dataset_name; a missing, empty or unreadable source is a ConfigError
    naming the flag and the fix."""
    if cfg.dataset_name is None:
        folder = Path(cfg.train_data_dir)
        if not folder.is_dir():
            raise ConfigError(
                f"--train_data_dir={str(folder)!r} is not a folder: pass the folder of your training data "
                f"({IMAGEFOLDER_LAYOUT})."
            )
        files = [p for p in folder.rglob("*") if p.is_file()]
        if not files:
            raise ConfigError(
                f"--train_data_dir={str(folder)!r} is empty: put the training data in it ({IMAGEFOLDER_LAYOUT}); "
                "`latentdiff make-dataset` writes such a folder of the shapes world."
            )
        if not any(p.name in METADATA_FILES for p in files):
            raise ConfigError(
                f"--train_data_dir={str(folder)!r} has no metadata.jsonl, so its images have no captions: add one "
                f"({IMAGEFOLDER_LAYOUT})."
            )
    try:
        return load_image_caption_dataset(
            cfg.dataset_name, cfg.train_data_dir, cfg.dataset_config_name, cache_dir=cfg.cache_dir
        )
    except Exception as error:  # noqa: BLE001 - whatever datasets raises, the data source is what to fix
        flag, value = (
            ("--dataset_name", cfg.dataset_name)
            if cfg.dataset_name
            else ("--train_data_dir", cfg.train_data_dir)
        )
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(
            f"{flag}={str(value)!r} could not be read as a dataset ({type(error).__name__}: {reason}). Pass a "
            f"local folder ({IMAGEFOLDER_LAYOUT}) or the name of a hub dataset (which needs the network, or its "
            "copy in --cache_dir)."
        ) from error


def count_missing_captions(dataset, cfg: LoopConfig) -> list[int]:
    """The rows without a caption (missing, null or empty) in --caption_column: warned of, and refused when they are
    more than --max_missing_captions of the rows. Returns their indices."""
    column = cfg.caption_column
    values = dataset[column]
    try:
        missing = [i for i, value in enumerate(values) if not any(c.strip() for c in captions_of(value))]
    except TypeError:
        return []  # not strings at all: check_columns names the column's type
    if not missing:
        return missing
    share = len(missing) / len(values)
    others = [
        name
        for name in dataset.column_names
        if name not in (column, cfg.image_column)
        and any(isinstance(value, str) and value.strip() for value in dataset.select(missing)[name])
    ]
    what = (
        f"{len(missing)} of {len(values)} rows ({share:.0%}) have no caption in --caption_column={column!r} "
        "(missing, null or empty)"
    )
    hint = f"; those rows have text in {others} (a misspelled caption key?)" if others else ""
    if share > cfg.max_missing_captions:
        raise ConfigError(
            f"{what}{hint}. That is more than --max_missing_captions={cfg.max_missing_captions}: fix the captions, "
            f"pass the right --caption_column (the dataset's columns are {list(dataset.column_names)}), or raise "
            "--max_missing_captions to train those rows as the empty prompt."
        )
    logger.warning("%s: they train as the empty prompt (rows %s)%s", what, missing[:20], hint)
    return missing


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
            raise ConfigError(
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
