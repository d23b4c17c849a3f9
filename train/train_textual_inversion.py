"""Learn a new word for a concept: textual inversion (Gal et al. 2022) on a frozen text-to-image model.

    accelerate launch --config_file accelerate_config.yaml train/train_textual_inversion.py \
        --config train/configs/shapes_textual_inversion_star.yaml
    accelerate launch ... train/train_textual_inversion.py --pretrained_model_name_or_path PATH --train_data_dir DATA \
        --placeholder_token "<cat-toy>" --initializer_token toy --replace_word toy

Options: `python train/train_textual_inversion.py --help`: every flag of train_t2i.py plus --placeholder_token,
--initializer_token, --num_vectors and --replace_word. Only the new word's embedding trains; at the end --output_dir
holds learned_embeds.safetensors ({token: (N, D)}, diffusers' format: `LatentPipeline.load_textual_inversion(dir)`,
`latentdiff generate --textual-inversion dir`), next to its checkpoints, validation grids and logs.
"""

from __future__ import annotations

from accelerate.utils import set_seed

from train.arguments import parse_config
from train.data import load_data
from train.launch import make_accelerator, run_and_export, script_main, weight_dtype_of
from train.loop import Trainer
from train.output_dir import prepare_output_dir
from train.randomness import resolve_seed
from train.tasks.t2i_models import build_models, resolve_model_files
from train.tasks.textual_inversion import TextualInversionConfig, TextualInversionTask, add_placeholder


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the exit status (0 done, 1 stopped on a non-finite loss)."""
    cfg = parse_config(argv, TextualInversionConfig)
    files = resolve_model_files(cfg)
    accelerator = make_accelerator(cfg)
    prepare_output_dir(cfg, accelerator)
    seed = resolve_seed(cfg, accelerator)
    set_seed(seed)
    with accelerator.main_process_first():
        data = load_data(cfg)

    models = build_models(cfg, files, accelerator.device, weight_dtype_of(accelerator))
    task = TextualInversionTask(cfg, models, accelerator, seed)
    train_set, holdout, collate = task.datasets(
        data
    )  # before S* is added: the latent cache of the model is reused
    trained = add_placeholder(cfg, models, weight_dtype_of(accelerator))  # S* in the tokenizer; v* trains
    task.attach_holdout(holdout, collate)
    trainer = Trainer(
        cfg, accelerator, trained, task.compute_loss, train_set, collate, seed=seed, validate=task.validate
    )
    return run_and_export(cfg, accelerator, trainer, task.export, seed)


if __name__ == "__main__":
    script_main(main)
