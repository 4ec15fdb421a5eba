"""Content hashes of artifacts and stage keys."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_hashes(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 for every file below a directory."""
    return {
        str(path.relative_to(directory)): file_sha256(path)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def stage_key(stage: str, version: int, config: Any, inputs: dict[str, str]) -> str:
    """Hash of (stage, its code version, its own configuration, the hashes of its inputs)."""
    payload = canonical_json({"stage": stage, "version": version, "config": config, "inputs": inputs})
    return hashlib.sha256(payload.encode()).hexdigest()


def combined_hash(hashes: dict[str, str]) -> str:
    return hashlib.sha256(canonical_json(hashes).encode()).hexdigest()


def canonical_json(value: Any) -> str:
    """The JSON that stage keys are hashed from: sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
