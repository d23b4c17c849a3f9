#!/usr/bin/env bash
# Rebuild the embedded default model from nothing: datasets -> VAE -> UNet (and its text tower) -> ship -> bench.
#
#   bash train/build_default.sh            # from the repository root, after the README's install command
#
# Every stage checkpoints into outputs/default/ and resumes (--resume_from_checkpoint latest) when run again, so an
# interrupted build continues where it stopped. Each stage's values are in train/configs/shapes_*.yaml; each stage
# gets every core.
#
# The recipe trains only what the default ships. There is no contrastive CLIP stage: the shipped text tower is
# trained from fresh weights along with the UNet (shapes_t2i.yaml says why), so of a contrastive CLIP the UNet stage
# would use only the word-level tokenizer and the tower's width, and those it reads from the shipped default's
# text_encoder/ and tokenizer/ (each caption word one token; train/train_clip.py, an example of its own, built it:
# `--config train/configs/shapes_clip.yaml` builds it again and trains a CLIP in 27 min).
set -euo pipefail
cd "$(dirname "$0")/.."
launch="accelerate launch --config_file accelerate_config.yaml"
log=outputs/default
mkdir -p "$log"
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stamp "1/4 datasets: 20,000 shapes scenes at 64 px; for the VAE, 20,000 more, half of them random polygons"
if [ ! -f data/shapes64/metadata.jsonl ]; then
  latentdiff make-dataset shapes data/shapes64 --num-images 20000 --size 64 --seed 1
fi
if [ ! -f data/vae64/metadata.jsonl ]; then
  latentdiff make-dataset shapes data/vae64 --num-images 20000 --size 64 --seed 2 --polygon-fraction 0.5
fi

stamp "2/4 VAE, two runs (log: $log/vae.log)"
# 1,500 steps from scratch, then 1,500 more at half the learning rate (shapes_vae_refine.yaml)
( $launch train/train_vae.py --config train/configs/shapes_vae.yaml \
    && $launch train/train_vae.py --config train/configs/shapes_vae_refine.yaml ) > "$log/vae.log" 2>&1 \
  || { echo "VAE training failed: see $log/vae.log" >&2; exit 1; }

stamp "3/4 UNet and text tower (log: $log/unet.log)"
$launch train/train_t2i.py --config train/configs/shapes_t2i.yaml > "$log/unet.log" 2>&1 \
  || { echo "UNet training failed: see $log/unet.log" >&2; exit 1; }

stamp "4/4 ship (float16 weights) and bench"
python train/export_default.py outputs/default/pipeline latentdiff/assets/default
latentdiff bench --json "$log/bench.json" --grid "$log/bench.png"
stamp "done"
