#!/usr/bin/env bash
# Rebuild the embedded default model from nothing: dataset -> VAE and CLIP (side by side) -> UNet -> ship -> bench.
#
#   bash train/build_default.sh            # from the repository root, after the README's install command
#
# Every stage checkpoints into outputs/default/ and resumes (--resume_from_checkpoint latest) when run again, so an
# interrupted build continues where it stopped. Each stage's values are in train/configs/shapes_*.yaml.
# The VAE and CLIP stages share the two cores of a small machine, one thread each (two OpenMP jobs with two threads
# each on two cores run ~10x slower than one thread each); the UNet stage gets every core.
set -euo pipefail
cd "$(dirname "$0")/.."
launch="accelerate launch --config_file accelerate_config.yaml"
log=outputs/default
mkdir -p "$log"
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stamp "1/5 datasets: 20,000 shapes scenes at 64 px; for the VAE, 20,000 more, half of them random polygons"
if [ ! -f data/shapes64/metadata.jsonl ]; then
  latentdiff make-dataset shapes data/shapes64 --num-images 20000 --size 64 --seed 1
fi
if [ ! -f data/vae64/metadata.jsonl ]; then
  latentdiff make-dataset shapes data/vae64 --num-images 20000 --size 64 --seed 2 --polygon-fraction 0.5
fi

stamp "2/5 VAE (two runs) and 3/5 CLIP, side by side (logs: $log/vae.log, $log/clip.log)"
# the VAE in two runs: 1,500 steps from scratch, then 1,500 more at half the learning rate (shapes_vae_refine.yaml)
( OMP_NUM_THREADS=1 $launch train/train_vae.py --config train/configs/shapes_vae.yaml \
    && OMP_NUM_THREADS=1 $launch train/train_vae.py --config train/configs/shapes_vae_refine.yaml ) > "$log/vae.log" 2>&1 &
vae=$!
OMP_NUM_THREADS=1 $launch train/train_clip.py --config train/configs/shapes_clip.yaml > "$log/clip.log" 2>&1 &
clip=$!
wait $vae || { echo "VAE training failed: see $log/vae.log" >&2; exit 1; }
wait $clip || { echo "CLIP training failed: see $log/clip.log" >&2; exit 1; }

stamp "4/5 UNet (log: $log/unet.log)"
$launch train/train_t2i.py --config train/configs/shapes_t2i.yaml > "$log/unet.log" 2>&1 \
  || { echo "UNet training failed: see $log/unet.log" >&2; exit 1; }

stamp "5/5 ship (float16 weights) and bench"
python train/export_default.py outputs/default/pipeline latentdiff/assets/default
latentdiff bench --json "$log/bench.json" --grid "$log/bench.png"
stamp "done"
