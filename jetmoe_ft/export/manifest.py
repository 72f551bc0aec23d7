"""The head of `export.json`: what was exported, from what (sha256 fingerprints of the run and its base), with which
libraries."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

from .sources import Source

LIBRARIES = ("torch", "transformers", "peft", "safetensors", "huggingface_hub", "jetmoe-ft")


def describe(source: Source, dtype: str, written: dict[str, Any]) -> dict[str, Any]:
    """What export.json records before the checks: the source, its base, the task, dtype, versions and files."""
    return {
        "format": 1,
        "source": {
            "path": str(source.path.absolute()),
            "kind": source.kind,
            "sha256": files_digest(source.path),
        },
        "base": {"name": source.base, "sha256": base_digest(source)},
        "base_model": source.hub_base,
        "task": source.task,
        "head": source.head,
        "loop": source.loop,
        "datasets": source.datasets,
        "model_class": source.model_class.__name__,
        "dtype": dtype,
        "versions": versions(),
        "written": written,
    }


def files_digest(folder: Path) -> str:
    """sha256 over a directory's weight and config files (names and bytes)."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*config.json")):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def base_digest(source: Source) -> str:
    """The base's fingerprint: its files' sha256, the tiny model's seed, or the hub id."""
    if source.base_is_tiny:
        return f"jetmoe-ft/tiny model_seed {source.seed}"
    local = Path(source.base).expanduser()
    return files_digest(local) if local.is_dir() else f"hub {source.base}"


def versions() -> dict[str, str]:
    """Python's and the libraries' versions the export ran with."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
