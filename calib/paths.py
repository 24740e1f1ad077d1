"""Where each stage reads and writes (one place, so notebooks never hard-code paths).

All paths are relative to the repository root, which is the working directory of every
DVC stage.
"""

from __future__ import annotations

from pathlib import Path

PREPARED = Path("data/prepared")
SPLITS_FILE = PREPARED / "splits.safetensors"
DATASET_FILE = PREPARED / "dataset.json"
MODELS = Path("models")
RESULTS = Path("results")
FIGURES = Path("figures")
REPORTS = Path("reports")


def model_dir(name: str) -> Path:
    """Checkpoint folder of model ``name`` (DVC cache): model.safetensors, model.json, logits."""
    return MODELS / name


def results_dir(name: str) -> Path:
    """Small committed results of model ``name``: metrics JSON, tables."""
    return RESULTS / name


def figures_dir(name: str) -> Path:
    """Committed figures of model ``name``."""
    return FIGURES / name
