"""DreamBooth (Ruiz et al. 2023): fine-tune a text-to-image model on a subject's images, with prior preservation.

    accelerate launch --config_file accelerate_config.yaml train/train_dreambooth.py \
        --config train/configs/shapes_dreambooth_star.yaml
    accelerate launch ... train/train_dreambooth.py --pretrained_model_name_or_path PATH \
        --instance_data_dir dog --instance_prompt "a photo of sks dog" \
        --with_prior_preservation --class_data_dir dog-class --class_prompt "a photo of dog" --num_class_images 200 \
        [--use_lora --rank 8] [--train_text_encoder]

Options: `python train/train_dreambooth.py --help`: every flag of train_lora.py plus diffusers' DreamBooth flags.
The class images are drawn by the base model once into --class_data_dir and reused. At the end --output_dir holds
the fine-tuned pipeline (`LatentPipeline.from_pretrained(output_dir)`), or with --use_lora the adapter
(`pipe.load_lora_weights(output_dir)`), next to its checkpoints, validation grids and logs.
"""

from __future__ import annotations

from accelerate.utils import set_seed

from latentdiff.sampling_settings import read_sampling_settings
from train.arguments import parse_config
from train.launch import make_accelerator, run_and_export, script_main, weight_dtype_of
from train.loop import Trainer
from train.output_dir import prepare_output_dir
from train.randomness import resolve_seed
from train.tasks.dreambooth import DreamBoothConfig, DreamBoothTask, generate_class_images, instance_images
from train.tasks.lora import add_adapters, check_lora_targets, checkpoint_trained_parameters_only
from train.tasks.t2i_models import build_models, resolve_model_files, trained_module


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the exit status (0 done, 1 stopped on a non-finite loss)."""
    cfg = parse_config(argv, DreamBoothConfig)
    files = resolve_model_files(cfg)
    if cfg.use_lora:
        check_lora_targets(cfg, files)
    settings = read_sampling_settings(files.model_folder)  # the base model's: class images, and the export
    accelerator = make_accelerator(cfg)
    prepare_output_dir(cfg, accelerator)
    seed = resolve_seed(cfg, accelerator)
    set_seed(seed)
    with accelerator.main_process_first():
        instances = instance_images(cfg)

    weight_dtype = weight_dtype_of(accelerator)
    models = build_models(cfg, files, accelerator.device, weight_dtype)
    classes = (
        generate_class_images(cfg, models, accelerator, seed, settings)
        if cfg.with_prior_preservation
        else None
    )  # by the base model, before any weight changes
    if cfg.use_lora:
        trained = add_adapters(cfg, models, weight_dtype, seed)
        checkpoint_trained_parameters_only(accelerator)
    else:
        trained = trained_module(cfg, models)
    task = DreamBoothTask(cfg, models, accelerator, seed, settings)
    train_set, collate = task.paired_datasets(instances, classes)  # and the held-out instances
    trainer = Trainer(
        cfg, accelerator, trained, task.compute_loss, train_set, collate, seed=seed, validate=task.validate
    )
    return run_and_export(cfg, accelerator, trainer, task.export, seed)


if __name__ == "__main__":
    script_main(main)
