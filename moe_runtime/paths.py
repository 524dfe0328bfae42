"""Where the checkout's shipped files are: the one place that finds the repository root."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS = REPO_ROOT / "assets"
EMBEDDED_MODEL_DIR = ASSETS / "tiny-mixtral"
SHIPPED_TRACE = ASSETS / "traces" / "tiny-mixtral.json"
TRAINING_TEXT = ASSETS / "data" / "tinyshakespeare.txt"
