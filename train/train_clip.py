"""Train a small `transformers.CLIPModel` contrastively on image-caption pairs; its text tower conditions the UNet.

    accelerate launch --config_file accelerate_config.yaml train/train_clip.py --config train/configs/shapes_clip.yaml

Options: `python train/train_clip.py --help`: the loop's flags (data, optimisation, checkpoints, validation), plus
--clip_config, --tokenizer_name_or_path (default: a word-level tokenizer built from the captions),
--tokenizer_extra_words and --max_text_length. At the end --output_dir holds clip/ (the whole model),
text_encoder/ and tokenizer/ (pass --output_dir to train_t2i.py as --pretrained_text_encoder_name_or_path).
"""

from __future__ import annotations

from accelerate.utils import set_seed

from train.arguments import parse_config
from train.data import load_data
from train.launch import make_accelerator, run_and_export, script_main
from train.loop import Trainer
from train.output_dir import prepare_output_dir
from train.randomness import resolve_seed
from train.tasks.clip import ClipConfig, ClipTask, build_clip, build_tokenizer


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the exit status (0 done, 1 stopped on a non-finite loss)."""
    cfg = parse_config(argv, ClipConfig)
    accelerator = make_accelerator(cfg)
    prepare_output_dir(
        cfg, accelerator
    )  # refuse to train over an earlier run; --overwrite_output_dir clears it
    seed = resolve_seed(cfg, accelerator)
    set_seed(seed)  # the initial weights
    with accelerator.main_process_first():
        data = load_data(cfg)
        tokenizer = build_tokenizer(cfg, data)
    clip = build_clip(cfg, tokenizer)
    task = ClipTask(cfg, clip, tokenizer, accelerator, seed)
    train_set, collate = task.datasets(data)
    trainer = Trainer(
        cfg, accelerator, clip, task.compute_loss, train_set, collate, seed=seed, validate=task.validate
    )
    return run_and_export(cfg, accelerator, trainer, task.export, seed)


if __name__ == "__main__":
    script_main(main)
