"""Train a LoRA adapter on a frozen text-to-image model (a Stable Diffusion folder or this project's default).

    accelerate launch --config_file accelerate_config.yaml train/train_lora.py --config train/configs/shapes_lora_star.yaml
    accelerate launch ... train/train_lora.py --pretrained_model_name_or_path PATH --train_data_dir DATA --rank 8

Options: `python train/train_lora.py --help`: every flag of train_t2i.py plus --rank, --lora_alpha, --lora_dropout,
--lora_targets, --train_text_encoder and --save_format. At the end --output_dir holds the adapter
(pytorch_lora_weights.safetensors and lora_config.json, in diffusers' keys, or kohya's with --save_format kohya for
the web UIs: `LatentPipeline.load_lora_weights(output_dir)`, `latentdiff generate --lora output_dir` read both), next
to its checkpoints, validation grids and logs.
"""

from __future__ import annotations

from accelerate.utils import set_seed

from train.arguments import parse_config
from train.data import load_data
from train.launch import make_accelerator, run_and_export, script_main, weight_dtype_of
from train.loop import Trainer
from train.output_dir import prepare_output_dir
from train.randomness import resolve_seed
from train.tasks.lora import (
    LoraConfig,
    LoraTask,
    add_adapters,
    check_lora_targets,
    checkpoint_trained_parameters_only,
)
from train.tasks.t2i_models import build_models, resolve_model_files


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the exit status (0 done, 1 stopped on a non-finite loss)."""
    cfg = parse_config(argv, LoraConfig)
    files = resolve_model_files(cfg)  # configs read once; sizes and widths checked before anything is loaded
    check_lora_targets(cfg, files)  # --lora_targets against the UNet's config
    accelerator = make_accelerator(cfg)
    prepare_output_dir(
        cfg, accelerator
    )  # refuse to train over an earlier run; --overwrite_output_dir clears it
    seed = resolve_seed(cfg, accelerator)
    set_seed(seed)
    with accelerator.main_process_first():
        data = load_data(cfg)

    weight_dtype = weight_dtype_of(accelerator)
    models = build_models(cfg, files, accelerator.device, weight_dtype)
    trained = add_adapters(cfg, models, weight_dtype, seed)
    task = LoraTask(cfg, models, accelerator, seed)
    train_set, holdout, collate = task.datasets(data)
    task.attach_holdout(holdout, collate)
    checkpoint_trained_parameters_only(accelerator)
    trainer = Trainer(
        cfg, accelerator, trained, task.compute_loss, train_set, collate, seed=seed, validate=task.validate
    )
    return run_and_export(cfg, accelerator, trainer, task.export, seed)


if __name__ == "__main__":
    script_main(main)
