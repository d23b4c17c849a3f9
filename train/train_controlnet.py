"""Train a ControlNet on a frozen text-to-image model (a Stable Diffusion folder or this project's default).

    accelerate launch --config_file accelerate_config.yaml train/train_controlnet.py \
        --pretrained_model_name_or_path latentdiff/assets/default --train_data_dir DATA \
        --conditioning_image_column conditioning_image --resolution 64

Options: `python train/train_controlnet.py --help`: every flag of train_t2i.py plus --controlnet_model_name_or_path,
--conditioning_image_column and --conditioning_embedding_out_channels. The data is an imagefolder whose
metadata.jsonl rows name the target image (file_name), its caption (text) and its condition image (a path relative
to the folder, in --conditioning_image_column). At the end --output_dir holds the ControlNet (config.json and
diffusion_pytorch_model.safetensors, diffusers' ControlNetModel layout: `ControlNetPipeline(...,
controlnet=output_dir)`, `latentdiff generate --control IMAGE --controlnet output_dir`), next to its checkpoints,
validation grids and logs.
"""

from __future__ import annotations

from accelerate.utils import set_seed

from train.arguments import parse_config
from train.data import load_data
from train.launch import make_accelerator, run_and_export, script_main, weight_dtype_of
from train.loop import Trainer
from train.randomness import resolve_seed
from train.tasks.controlnet import ControlNetTask, ControlNetTrainConfig, build_controlnet
from train.tasks.t2i_models import build_models, resolve_model_files


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the exit status (0 done, 1 stopped on a non-finite loss)."""
    cfg = parse_config(argv, ControlNetTrainConfig)
    files = resolve_model_files(cfg)  # configs read once; sizes and widths checked before anything is loaded
    accelerator = make_accelerator(cfg)
    seed = resolve_seed(cfg, accelerator)
    set_seed(seed)
    with accelerator.main_process_first():
        data = load_data(cfg)

    weight_dtype = weight_dtype_of(accelerator)
    models = build_models(cfg, files, accelerator.device, weight_dtype)
    controlnet = build_controlnet(cfg, models, weight_dtype)
    task = ControlNetTask(cfg, models, accelerator, seed)
    train_set, holdout, collate = task.datasets(data)
    task.attach_holdout(holdout, collate)
    trainer = Trainer(
        cfg, accelerator, controlnet, task.compute_loss, train_set, collate, seed=seed, validate=task.validate
    )
    return run_and_export(cfg, accelerator, trainer, task.export, seed)


if __name__ == "__main__":
    script_main(main)
