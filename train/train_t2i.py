"""Train a text-to-image UNet: fine-tune a Stable Diffusion folder's UNet, or train one from scratch.

    accelerate launch --config_file accelerate_config.yaml train/train_t2i.py --config train/configs/example_t2i.yaml
    torchrun --nproc_per_node 2 train/train_t2i.py --config ...        # several CPU processes (gloo)
    python -m train.train_t2i --config ...                             # the same, as a module

Options: `python train/train_t2i.py --help` (diffusers' train_text_to_image.py names). At the end --output_dir holds
a Stable Diffusion folder (`LatentPipeline.from_pretrained(output_dir)`), next to its checkpoints, validation grids
and logs.
"""

from __future__ import annotations

from accelerate.utils import set_seed

from train.arguments import parse_config
from train.data import load_data
from train.launch import make_accelerator, run_and_export, script_main, weight_dtype_of
from train.loop import Trainer
from train.output_dir import prepare_output_dir
from train.randomness import resolve_seed
from train.tasks.t2i import TextToImageTask
from train.tasks.t2i_config import T2IConfig
from train.tasks.t2i_models import build_models, resolve_model_files, trained_module


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the exit status (0 done, 1 stopped on a non-finite loss)."""
    cfg = parse_config(argv, T2IConfig)
    files = resolve_model_files(cfg)  # configs read once; sizes and widths checked before anything is loaded
    accelerator = make_accelerator(cfg)
    prepare_output_dir(
        cfg, accelerator
    )  # refuse to train over an earlier run; --overwrite_output_dir clears it
    seed = resolve_seed(cfg, accelerator)
    set_seed(seed)  # the initial weights of a UNet trained from scratch
    with accelerator.main_process_first():
        data = load_data(cfg)  # the caption and image columns are checked here, before the models load

    models = build_models(cfg, files, accelerator.device, weight_dtype_of(accelerator))
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
