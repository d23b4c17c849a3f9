"""Bad training inputs, as a new user would give them (issue 24): each is refused with one sentence that names the
flag, file or folder and the fix, before anything is loaded or written, and nothing an earlier run wrote is lost
(its files are compared byte for byte before and after)."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import PartialState

import train.checkpoints
import train.data
import train.launch
from tests.test_data import make_imagefolder
from tests.test_train import REPO, parse_t2i, subprocess_env, t2i_args, toy_cfg, toy_trainer
from train import train_t2i
from train.loop_config import ConfigError
from train.output_dir import check_output_dir
from train.tasks import t2i_models


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `folder`."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def rewrite_captions(folder: Path, change) -> Path:
    """Apply `change(index, row) -> row` to every line of the imagefolder's metadata.jsonl."""
    metadata = folder / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    metadata.write_text("".join(json.dumps(change(i, row)) + "\n" for i, row in enumerate(rows)))
    return folder


T2I_BASE = ["--train_data_dir", "data", "--pretrained_model_name_or_path", "model"]


# ---- item 2: an earlier run in --output_dir --------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_into_an_earlier_runs_folder_is_refused_and_overwrite_starts_clean(
    tmp_path, tiny_sd_dir, train_data, one_thread, caplog
):
    out = tmp_path / "run"
    assert (
        train_t2i.main(t2i_args(tiny_sd_dir, train_data, out, max_train_steps=2, checkpointing_steps=1)) == 0
    )
    earlier = snapshot(out)
    assert "checkpoint-2/checksums.json" in earlier and "model_index.json" in earlier

    # the same command again: refused by the script in one line, before anything is written
    script = subprocess.run(
        [sys.executable, str(REPO / "train" / "train_t2i.py"), *t2i_args(tiny_sd_dir, train_data, out)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 2 and "Traceback" not in script.stderr, script.stderr[-2000:]
    assert f"train_t2i.py: error: --output_dir='{out}' already holds" in script.stderr
    assert "--resume_from_checkpoint latest" in script.stderr and "--overwrite_output_dir" in script.stderr
    assert snapshot(out) == earlier

    # --overwrite_output_dir never deletes a file no training run writes: it names it and deletes nothing
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match=r"also holds notes\.txt, which no T2IConfig run writes"):
        train_t2i.main(t2i_args(tiny_sd_dir, train_data, out, overwrite_output_dir=True))
    (out / "notes.txt").unlink()
    assert snapshot(out) == earlier

    # it deletes the earlier run (every entry a run wrote is recognised): 'latest' then cannot resume the old run
    flags = dict(max_train_steps=1, checkpointing_steps=1)
    with caplog.at_level(logging.INFO):
        assert train_t2i.main(t2i_args(tiny_sd_dir, train_data, out, overwrite_output_dir=True, **flags)) == 0
    done = [r.getMessage() for r in caplog.records if "done: 1 steps" in r.getMessage()]
    assert done and "speed not measured" in done[0] and "nan" not in done[0]  # a 1-step run times no step
    assert [p.name for p in train.checkpoints.list_checkpoints(out)] == ["checkpoint-1"]
    assert train.checkpoints.find_checkpoint(out, "latest") == out / "checkpoint-1"
    assert snapshot(out)["checkpoint-1/checksums.json"] != earlier["checkpoint-1/checksums.json"]


def test_latest_in_a_folder_with_an_export_but_no_checkpoint_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    overwrite = parse_t2i([*T2I_BASE, "--output_dir", str(tmp_path), "--overwrite_output_dir"])
    with pytest.raises(
        ConfigError, match="has no train_config.yaml .*model_index.json, unet/ may not be a run's"
    ):
        check_output_dir(overwrite)  # a model folder, not a run's: never deleted
    with pytest.raises(ConfigError, match=r"has no checkpoint to resume, but holds model_index\.json, unet/"):
        check_output_dir(
            parse_t2i([*T2I_BASE, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
        )
    (tmp_path / "model_index.json").unlink()
    (tmp_path / "unet").rmdir()
    (tmp_path / "train_config.yaml").write_text("{}")  # a run that stopped before its first checkpoint
    (tmp_path / "latent_cache").mkdir()
    cfg = parse_t2i([*T2I_BASE, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert check_output_dir(cfg) == []  # starts a new run
    inside = tmp_path / "checkpoint-3"
    inside.mkdir()
    with pytest.raises(ConfigError, match="--overwrite_output_dir would delete --resume_from_checkpoint"):
        check_output_dir(
            parse_t2i([*T2I_BASE, "--output_dir", str(tmp_path), "--overwrite_output_dir",
                       "--resume_from_checkpoint", str(inside)])
        )  # fmt: skip
    cfg = parse_t2i([*T2I_BASE, "--output_dir", str(tmp_path), "--overwrite_output_dir"])
    assert [p.name for p in check_output_dir(cfg)] == [
        "checkpoint-3",
        "train_config.yaml",
    ]  # the cache is kept


# ---- item 6: rows without a caption --------------------------------------------------------------------------


def test_rows_without_a_caption_are_counted_and_too_many_refused(tmp_path, caplog):
    PartialState()  # the training loggers log from the main process only
    no_text = rewrite_captions(
        make_imagefolder(tmp_path / "no_text"),
        lambda i, row: row if i % 3 == 0 else {"file_name": row["file_name"]},
    )
    args = ["--train_data_dir", str(no_text), "--pretrained_model_name_or_path", "m"]
    with pytest.raises(ConfigError, match=r"6 of 9 rows \(67%\) have no caption in --caption_column='text'.*"
                                          r"more than --max_missing_captions=0\.5"):  # fmt: skip
        train.data.load_data(parse_t2i(args))
    with caplog.at_level(logging.WARNING):
        assert len(train.data.load_data(parse_t2i([*args, "--max_missing_captions", "0.7"]))) == 9
    assert (
        "6 of 9 rows (67%) have no caption" in caplog.text and "they train as the empty prompt" in caplog.text
    )

    # a caption key misspelled in some lines: counted, and the other column is named
    typo = rewrite_captions(
        make_imagefolder(tmp_path / "typo"),
        lambda i, row: {"file_name": row["file_name"], ("txt" if i % 2 else "text"): row["text"]},
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train.data.load_data(
            parse_t2i(["--train_data_dir", str(typo), "--pretrained_model_name_or_path", "m"])
        )
    assert (
        "4 of 9 rows (44%) have no caption" in caplog.text
        and "those rows have text in ['txt'] (a misspelled caption key?)" in caplog.text
    )

    # a caption column that matches no row at all names the columns there are
    with pytest.raises(ConfigError, match=r"--caption_column='caption' is not a column.*\['image', 'text'\]"):
        train.data.load_data(parse_t2i([*args, "--caption_column", "caption"]))


# ---- item 8: damaged checkpoints -----------------------------------------------------------------------------


def test_latest_falls_back_past_damaged_checkpoints_and_a_named_damaged_one_is_refused(tmp_path, caplog):
    cfg = toy_cfg(tmp_path, checkpointing_steps=1, max_train_steps=3)
    uninterrupted = toy_trainer(cfg)
    uninterrupted.train()
    final = {k: v.clone() for k, v in uninterrupted.model.state_dict().items()}
    newest, middle = (
        tmp_path / "checkpoint-3" / "model.safetensors",
        tmp_path / "checkpoint-2" / "model.safetensors",
    )
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    flipped = bytearray(middle.read_bytes())
    flipped[-1] ^= 0xFF  # the same size, one byte changed
    middle.write_bytes(flipped)
    damaged = snapshot(tmp_path)

    with pytest.raises(
        ConfigError, match=r"checkpoint-3/model\.safetensors has \d+ bytes where \d+ were written"
    ):
        train.checkpoints.find_checkpoint(tmp_path, str(tmp_path / "checkpoint-3"))
    with pytest.raises(ConfigError, match=r"checkpoint-2/model\.safetensors does not match the checksum"):
        train.checkpoints.find_checkpoint(tmp_path, str(tmp_path / "checkpoint-2"))
    with caplog.at_level(logging.WARNING):
        assert train.checkpoints.find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-1"
    assert "skipping checkpoint-3" in caplog.text and "skipping checkpoint-2" in caplog.text
    assert snapshot(tmp_path) == damaged  # looking changed nothing

    # resuming from the intact checkpoint-1 ends where the uninterrupted run ended, and rewrites the damaged ones
    resumed = toy_trainer(
        toy_cfg(tmp_path, checkpointing_steps=1, max_train_steps=3, resume_from_checkpoint="latest")
    )
    assert resumed.train().global_step == 3
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=0)
    assert all(train.checkpoints.damage(p) is None for p in train.checkpoints.list_checkpoints(tmp_path))

    # every checkpoint damaged: refused, naming the files, rather than starting over silently
    for path in train.checkpoints.list_checkpoints(tmp_path):
        (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(
        ConfigError, match=r"no intact checkpoint in .*checkpoint-1/model\.safetensors has 0 bytes"
    ):
        train.checkpoints.find_checkpoint(tmp_path, "latest")

    # a checkpoint written before checksums existed is still resumed, with a warning that it is not verified
    (tmp_path / "checkpoint-3" / "checksums.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train.checkpoints.find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-3"
    assert (
        "checkpoint-3 has no checksums.json (an earlier version wrote it): its files are not verified"
        in caplog.text
    )


# ---- item 9: mixed precision on a CPU ------------------------------------------------------------------------


def test_fp16_on_a_cpu_is_refused_with_the_fix_and_the_example_config_does_not_ask_for_it(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"--mixed_precision fp16 needs a GPU.*--mixed_precision bf16.*--mixed_precision no"
    ):
        train.launch.make_accelerator(toy_cfg(tmp_path, mixed_precision="fp16"))
    monkeypatch.setenv(
        "ACCELERATE_MIXED_PRECISION", "fp16"
    )  # what `accelerate launch` passes from its config
    with pytest.raises(ConfigError, match="the accelerate config's mixed_precision: fp16 needs a GPU"):
        train.launch.make_accelerator(toy_cfg(tmp_path))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    example = parse_t2i(["--config", str(REPO / "train" / "configs" / "example_t2i.yaml")])
    assert example.mixed_precision is None  # the accelerate config's: 'no' in accelerate_config.yaml
    train.launch.check_mixed_precision(example, use_cpu=True)


@pytest.mark.slow
def test_the_example_config_runs_on_a_cpu_with_its_folders_given(
    tmp_path, tiny_sd_dir, train_data, one_thread
):
    """Every value of example_t2i.yaml but its two folders (the base model and the data, which a user supplies) and
    the sizes a 9-image tiny run needs."""
    example = REPO / "train" / "configs" / "example_t2i.yaml"
    args = ["--config", str(example), "--pretrained_model_name_or_path", str(tiny_sd_dir),
            "--train_data_dir", str(train_data), "--output_dir", str(tmp_path / "run"), "--resolution", "32",
            "--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_train_steps", "2",
            "--validation_holdout", "1", "--dataloader_num_workers", "0", "--report_to", "none"]  # fmt: skip
    assert train_t2i.main(args) == 0
    assert (tmp_path / "run" / "model_index.json").is_file() and list(
        (tmp_path / "run" / "validation").glob("*.png")
    )


# ---- item 11: the data folder --------------------------------------------------------------------------------


def test_a_missing_or_empty_data_folder_is_named_with_the_fix(tmp_path):
    def load(folder: Path):
        return train.data.load_data(
            parse_t2i(["--train_data_dir", str(folder), "--pretrained_model_name_or_path", "m"])
        )

    with pytest.raises(
        ConfigError, match=rf"--train_data_dir='{tmp_path / 'nope'}' is not a folder: pass the folder"
    ):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ConfigError, match=rf"--train_data_dir='{tmp_path / 'empty'}' is empty: put the training data"
    ):
        load(tmp_path / "empty")
    images = make_imagefolder(tmp_path / "images")
    (images / "metadata.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"has no metadata\.jsonl, so its images have no captions"):
        load(images)
    with pytest.raises(
        ConfigError, match=rf"--dataset_name='{tmp_path / 'nodata'}' could not be read as a dataset"
    ):
        train.data.load_data(
            parse_t2i(["--dataset_name", str(tmp_path / "nodata"), "--pretrained_model_name_or_path", "m"])
        )


# ---- item 7: other flags a new user gets wrong ---------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "-1"], r"--seed=-1 must be an integer >= 0 and <= 4294967295, e\.g\. 0 \(leave it unset"),
        (["--max_grad_norm", "nan"], r"--max_grad_norm=nan must be >= 0"),
        (["--max_missing_captions", "1.5"], r"--max_missing_captions=1\.5 must be >= 0 and <= 1"),
        (["--learning_rate", "inf"], r"--learning_rate=inf must be > 0"),
    ],
)
def test_nonsensical_numbers_are_refused_naming_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_t2i([*T2I_BASE, *flags])


def test_a_missing_model_folder_an_output_file_and_a_too_large_batch_are_named(tmp_path):
    cfg = parse_t2i(["--train_data_dir", "d", "--pretrained_model_name_or_path", str(tmp_path / "nomodel")])
    with pytest.raises(
        ConfigError, match=rf"--pretrained_model_name_or_path='{tmp_path / 'nomodel'}': no such folder"
    ):
        t2i_models.resolve_model_files(cfg)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match=r"--output_dir='.*a_file' is a file; pass a folder"):
        check_output_dir(parse_t2i([*T2I_BASE, "--output_dir", str(tmp_path / "a_file")]))
    with pytest.raises(ConfigError, match=r"the dataset has 10 samples, fewer than one global batch of 16"):
        toy_trainer(toy_cfg(tmp_path / "run", train_batch_size=16))


@pytest.mark.parametrize("script", sorted(path.name for path in (REPO / "train").glob("train_*.py")))
def test_every_training_script_prints_its_help(script):
    """`--help` lists the flags (a literal % in a flag's help once made argparse raise instead)."""
    done = subprocess.run(
        [sys.executable, f"train/{script}", "--help"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--output_dir" in done.stdout and "--config" in done.stdout
