"""Reading a build directory back: nothing in it is trusted until it matches the manifest's hashes.

`pipeline verify`, `pipeline serve` and `pipeline export-triton` (and the Python loader) take a build
directory that may come from elsewhere. The manifest is validated by its schema (manifest_schema.py);
every file they then use (model.onnx, the tokenizer, the TensorRT bundle, each stage's outputs and its
stage.json, verdicts included) must be a regular file (no symlink, FIFO or device) whose sha256 is the
manifest's. Trust decisions (trust_remote_code) never come from here: only from the user's own flags.
"""

from __future__ import annotations

import stat
from pathlib import Path

from pipeline.build.manifest import read_manifest
from pipeline.build.manifest_schema import Manifest, StageEntry, validate_manifest
from pipeline.core.errors import InputError
from pipeline.core.hashing import combined_hash, file_sha256

REBUILD = "run `pipeline build` again to re-create it"


def load_manifest(build_dir: Path) -> Manifest:
    return validate_manifest(read_manifest(build_dir), str(build_dir / "manifest.json"))


def _regular(path: Path, what: str) -> None:
    try:
        mode = path.lstat().st_mode
    except OSError:
        raise InputError(f"{what} {path} is missing; {REBUILD}") from None
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {path} is not a regular file (a symlink, folder or special file); {REBUILD}")


def checked_file(build_dir: Path, manifest: Manifest, name: str) -> Path:
    """An artifact of the build, after its bytes matched the manifest's hash."""
    path = build_dir / name
    if name not in manifest.artifacts:
        raise InputError(f"the manifest of {build_dir} does not list {name} (status '{manifest.status}'); {REBUILD}")
    _regular(path, "artifact")
    if file_sha256(path) != manifest.artifacts[name]:
        raise InputError(f"{path} does not match the manifest's sha256 (changed after the build); {REBUILD}")
    return path


def tree_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below a folder, refusing symlinks and special files."""
    if folder.is_symlink() or not folder.is_dir():
        raise InputError(f"{folder} is missing or not a folder; {REBUILD}")
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        _regular(path, "file")
        hashes[path.relative_to(folder).as_posix()] = file_sha256(path)
    return hashes


def checked_tree(build_dir: Path, manifest: Manifest, folder: str) -> Path:
    """A published folder (tokenizer/): exactly the files the manifest lists, with their hashes."""
    expected = {name[len(folder) + 1:]: digest for name, digest in manifest.artifacts.items()
                if name.startswith(f"{folder}/") and name != f"{folder}/"}
    if not expected:
        raise InputError(f"the manifest of {build_dir} lists no {folder}/ (status '{manifest.status}'); {REBUILD}")
    actual = tree_hashes(build_dir / folder)
    if actual != expected:
        changed = sorted(set(actual) ^ set(expected) | {n for n in actual if expected.get(n) not in (None, actual[n])})
        raise InputError(f"{build_dir / folder} does not match the manifest ({', '.join(changed[:3])}); {REBUILD}")
    return build_dir / folder


def checked_bundle(build_dir: Path, manifest: Manifest, folder: str) -> Path:
    """A published folder recorded by one combined hash (the TensorRT bundle, `trt/`)."""
    recorded = manifest.artifacts.get(f"{folder}/")
    if recorded is None:
        raise InputError(f"the manifest of {build_dir} lists no {folder}/ (status '{manifest.status}'); {REBUILD}")
    if combined_hash(tree_hashes(build_dir / folder)) != recorded:
        raise InputError(f"{build_dir / folder} does not match the manifest's hash; {REBUILD}")
    return build_dir / folder


def check_stage_record(directory: Path, entry: StageEntry) -> None:
    """A stage's stage.json and outputs exactly as the manifest recorded them (a forged verdict fails here)."""
    from pipeline.stages.base import STAGE_RECORD

    record = directory / STAGE_RECORD
    _regular(record, "stage record")
    if file_sha256(record) != entry.record_sha256:
        raise InputError(f"stage record {record} does not match the manifest's sha256 (edited after the build); "
                         f"{REBUILD}")
    actual = tree_hashes(directory)
    actual.pop(STAGE_RECORD, None)
    if actual != entry.outputs:
        raise InputError(f"stage output {directory} does not match the manifest's hashes; {REBUILD}")
