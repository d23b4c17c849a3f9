"""Where the embedded default model lives: a small complete pipeline folder shipped inside the package, trained by
this project's own scripts on the shapes world (`train/build_default.sh`), with its model card (README.md)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default"
# its noise-aware layout classifier for classifier guidance (train/configs/shapes_classifier.yaml)
DEFAULT_CLASSIFIER_DIR = Path(__file__).parent / "assets" / "classifier"
