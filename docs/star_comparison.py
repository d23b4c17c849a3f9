"""Draw docs/star_comparison.png: one row per spec "label|model|lora|textual_inversion|word", the same 8 star prompts
(4 small, 4 large, their bench seeds), marked by the strict detector.

    python docs/star_comparison.py docs/star_comparison.png "base||||" "LoRA||outputs/lora-star||" \
        "full ft + dec|outputs/ft-star-dec|||"
"""

import sys

import torch

from latentdiff.eval import shapesbench
from pipelines.latent_pipeline import LatentPipeline

prompts = [p for p in shapesbench.bench_prompts(["star"])]
small = [p for p in prompts if " small " in p.text][:4]
large = [p for p in prompts if " large " in p.text][:4]
chosen = small + large
images, labels = [], []
for spec in sys.argv[2:]:
    label, model, lora, ti, word = (spec.split("|") + [""] * 5)[:5]
    pipe = LatentPipeline() if not model else LatentPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    if ti:
        pipe.load_textual_inversion(ti)
    texts = [p.text.replace("star", word) if word else p.text for p in chosen]
    out = pipe(
        texts,
        num_inference_steps=4,
        guidance_scale=1.5,  # the default's carried settings: DDIM, 4 steps, guidance 1.5
        generator=[torch.Generator().manual_seed(p.seed) for p in chosen],
    ).images
    images += out
    labels += [f"{label}: {p.text.split(' in ')[0].split(' on ')[0].split(' at ')[0]}" for p in chosen]
shapesbench.save_grid(
    images,
    labels,
    sys.argv[1],
    columns=8,
    cell=64,
    marks=[shapesbench.matches_prompt(im, p.text) for im, p in zip(images, chosen * (len(sys.argv) - 2))],
)
print("saved", sys.argv[1])
