"""Train a `diffusers.AutoencoderKL` (the latent space of a text-to-image model) on an image dataset.

    accelerate launch --config_file accelerate_config.yaml train/train_vae.py --config train/configs/shapes_vae.yaml

Options: `python train/train_vae.py --help`: the loop's flags (data, optimisation, checkpoints, validation), plus
--vae_config (shape of a new VAE) or --pretrained_vae_model_name_or_path (fine-tune; --train_decoder_only keeps its
encoder), --kl_weight, --foreground_weight, --foreground_margin and --latent_sample. At the end --output_dir/vae holds a
diffusers AutoencoderKL folder with its measured scaling_factor (kept as it was with --train_decoder_only; pass the
folder to train_t2i.py as --pretrained_vae_model_name_or_path).
"""

from __future__ import annotations

from accelerate.utils import set_seed

from train.arguments import parse_config
from train.data import load_data
from train.launch import make_accelerator, run_and_export, script_main
from train.loop import Trainer
from train.output_dir import prepare_output_dir
from train.randomness import resolve_seed
from train.tasks.vae import VaeConfig, VaeTask, build_vae


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the exit status (0 done, 1 stopped on a non-finite loss)."""
    cfg = parse_config(argv, VaeConfig)
    accelerator = make_accelerator(cfg)
    prepare_output_dir(
        cfg, accelerator
    )  # refuse to train over an earlier run; --overwrite_output_dir clears it
    seed = resolve_seed(cfg, accelerator)
    set_seed(seed)  # the initial weights
    with accelerator.main_process_first():
        data = load_data(cfg)
    vae = build_vae(cfg)
    task = VaeTask(cfg, vae, accelerator, seed)
    train_set, collate = task.datasets(data)
    trainer = Trainer(
        cfg, accelerator, vae, task.compute_loss, train_set, collate, seed=seed, validate=task.validate
    )
    return run_and_export(cfg, accelerator, trainer, task.export, seed)


if __name__ == "__main__":
    script_main(main)
