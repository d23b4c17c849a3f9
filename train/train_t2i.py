"""Train a text-to-image UNet: fine-tune a Stable Diffusion folder's UNet, or train one from scratch.

    accelerate launch --config_file accelerate_config.yaml train/train_t2i.py --config train/configs/example_t2i.yaml
    torchrun --nproc_per_node 2 train/train_t2i.py --config ...        # several CPU processes (gloo)

Options: `python train/train_t2i.py --help` (diffusers' train_text_to_image.py names). At the end --output_dir holds
a Stable Diffusion folder (`LatentPipeline.from_pretrained(output_dir)`), next to its checkpoints, validation grids
and logs.
"""

from __future__ import annotations

from accelerate.utils import set_seed
from config import TrainConfig, parse_config
from t2i import TextToImageTask, build_models, check_model_files, load_data, trained_module, weight_dtype_of
from trainer import Trainer, make_accelerator, resolve_seed, run_and_export, script_main


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the exit status (0 done, 1 stopped on a non-finite loss)."""
    cfg = parse_config(argv, TrainConfig)
    check_model_files(cfg)  # resolution vs. the model's factor, channel widths: before anything is loaded
    accelerator = make_accelerator(cfg)
    seed = resolve_seed(cfg, accelerator)
    set_seed(seed)  # the initial weights of a UNet trained from scratch
    with accelerator.main_process_first():
        data = load_data(cfg)  # the caption and image columns are checked here, before the models load

    models = build_models(cfg, accelerator.device, weight_dtype_of(accelerator))
    task = TextToImageTask(cfg, models, accelerator, seed)
    train_set, holdout, collate = task.datasets(data)
    task.attach_holdout(holdout, collate)
    trainer = Trainer(
        cfg,
        accelerator,
        trained_module(cfg, models),
        task.compute_loss,
        train_set,
        collate,
        seed=seed,
        validate=task.validate,
    )
    return run_and_export(cfg, accelerator, trainer, task.export, seed)


if __name__ == "__main__":
    script_main(main)
