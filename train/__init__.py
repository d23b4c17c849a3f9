"""Training: one loop, its parts each in one file, one file per task, thin scripts on top.

    accelerate launch --config_file accelerate_config.yaml train/train_t2i.py --config train/configs/shapes_t2i.yaml

The loop and what it owns:
    loop_config.py  `LoopConfig`: the flags every task shares, each declared with its one rule; `ConfigError`
    arguments.py    `parse_config`: a config from a YAML file and the command line
    launch.py       the Accelerator, the frozen parts' dtype, trackers, `run_and_export`, `script_main`
    loop.py         `Trainer`: accumulation, clipping, AdamW, LR schedule, non-finite stop, validation schedule
    data.py         the dataset read and split once, and the resumable data order (`EpochBatchSampler`)
    randomness.py   `derive_seed`, `resolve_seed`, `BatchRandom` (per-micro-batch draws, process-count invariant)
    ema.py          `EMA` of the trained weights
    checkpoints.py  atomic checkpoints with checksums: save, find (past damaged ones), rotate, load
    output_dir.py   never train over an earlier run by accident; --overwrite_output_dir deletes only a run's files
The tasks (`train/tasks/`): a config extending `LoopConfig` with the task's own flags, its models, and a task object
with `compute_loss`, `validate` and `export`:
    tasks/t2i_config.py, tasks/t2i_models.py, tasks/t2i.py   text-to-image (full fine-tune or from scratch)
    tasks/inpaint.py, tasks/inpaint_masks.py   `--inpainting`: an SD-inpainting UNet (2C+1 inputs), random masks
    tasks/lora.py   LoRA adapters on the text-to-image task
    tasks/controlnet.py   a ControlNet on a frozen text-to-image model (condition images from a dataset column)
    tasks/vae.py    the autoencoder        tasks/clip.py   contrastive text-image pretraining
    tasks/classifier.py   the noise-aware layout classifier of classifier guidance
The scripts: train_t2i.py, train_lora.py, train_vae.py, train_clip.py, train_classifier.py, train_controlnet.py (each `main()` reads in
one screen), and export_default.py (ship a trained folder as the embedded default).

Training needs the `[train]` extras (accelerate, datasets, pyyaml, tensorboard): `pip install -e ".[train]"`.
"""

from importlib.util import find_spec

TRAIN_EXTRAS = {"accelerate": "accelerate", "datasets": "datasets", "yaml": "pyyaml"}

_missing = [package for module, package in TRAIN_EXTRAS.items() if find_spec(module) is None]
if _missing:
    raise ImportError(
        f"training needs {', '.join(_missing)}, which this environment lacks: install the training extras with "
        "`pip install -e \".[train]\"` (or `pip install 'latentdiff[train]'`)."
    )
