"""Variant manifests (TOML data) shipped with the package."""
from pathlib import Path

MANIFEST_DIR = Path(__file__).resolve().parent
