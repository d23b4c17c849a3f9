"""Train a noise-aware classifier on a diffusion model's noisy latents, for classifier guidance.

    latentdiff make-dataset shapes data/classifier64 --num-images 12000 --seed 7
    accelerate launch --config_file accelerate_config.yaml train/train_classifier.py \
        --config train/configs/shapes_classifier.yaml

Options: `python train/train_classifier.py --help`: the loop's flags (data, optimisation, checkpoints, validation),
plus --pretrained_model_name_or_path (the model whose VAE and noise schedule it is trained for; default: the embedded
one), --block_out_channels, --layers_per_block, --time_embed_dim, --pool_size, --validation_timesteps and
--irregular_images (extra scenes of distorted objects labelled `{colour} irregular`: latentdiff.data.irregular). At
the end --output_dir/classifier holds the classifier (`NoiseAwareClassifier.from_pretrained`; pass it to
LatentPipeline as `classifier=`, or to `latentdiff generate --classifier`), and accuracy_against_t.json its held-out
accuracy.
"""

from __future__ import annotations

from accelerate.utils import set_seed

from train.arguments import parse_config
from train.data import load_data
from train.launch import make_accelerator, run_and_export, script_main
from train.loop import Trainer
from train.randomness import resolve_seed
from train.tasks.classifier import ClassifierTask, ClassifierTaskConfig, build_classifier, build_frozen_parts


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the exit status (0 done, 1 stopped on a non-finite loss)."""
    cfg = parse_config(argv, ClassifierTaskConfig)
    accelerator = make_accelerator(cfg)
    seed = resolve_seed(cfg, accelerator)
    set_seed(seed)  # the initial weights
    with accelerator.main_process_first():
        data = load_data(cfg)
    frozen = build_frozen_parts(cfg, accelerator.device)
    classifier = build_classifier(cfg, frozen.vae)
    task = ClassifierTask(cfg, frozen, accelerator, seed)
    train_set, collate = task.datasets(data)
    trainer = Trainer(
        cfg, accelerator, classifier, task.compute_loss, train_set, collate, seed=seed, validate=task.validate
    )
    return run_and_export(cfg, accelerator, trainer, task.export, seed)


if __name__ == "__main__":
    script_main(main)
