"""Integrity manifests: the SHA-256 and size of every file of a checkpoint directory.

Neither torch DCP nor megatron stores checksums, so a flipped byte in a tensor file loads
silently. At save, every rank hashes the files it wrote right after writing them (they are
still in the page cache), rank 0 collects the digests and renames ``modse_manifest.json`` into
place as the last file of the checkpoint; only then is the checkpoint directory renamed to its
final name. At load the files are verified (split over the ranks) before anything is read.

A checkpoint saved with a manifest records that in its common state
(``meta["integrity"] == "sha256-manifest"``), so a deleted manifest is an error, while a
checkpoint from before manifests loads with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from modse_megatron.checkpoint.errors import CheckpointError

MANIFEST = "modse_manifest.json"
FORMAT = "modse-checkpoint-manifest"
#: Value of ``meta["integrity"]`` in checkpoints saved with a manifest.
INTEGRITY = "sha256-manifest"
_CHUNK = 8 << 20


class IntegrityError(CheckpointError):
    """A checkpoint file does not match its manifest (or the manifest is missing/damaged)."""


def file_digest(path: str | os.PathLike) -> dict[str, int | str]:
    """``{"size", "sha256"}`` of one file, read in 8 MiB chunks (memory stays flat)."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """Names of the files a manifest covers (everything but the manifest and temp files)."""
    return sorted(p.name for p in Path(directory).iterdir()
                  if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))


def files_of_rank(names: Iterable[str], rank: int, world: int) -> list[str]:
    """The files ``rank`` wrote and hashes at save: DCP's ``__{rank}_{i}.distcp``; rank 0 also
    takes the shared ones (``.metadata``, ``common.pt``, ``metadata.json``)."""
    mine = []
    for name in names:
        parts = name.split("_")
        owner = int(parts[2]) if name.startswith("__") and len(parts) > 3 and parts[2].isdigit() else 0
        if owner % world == rank:
            mine.append(name)
    return mine


def write_manifest(directory: str | os.PathLike, digests: dict[str, dict]) -> Path:
    """Write the manifest atomically (temp file, fsync, rename)."""
    directory = Path(directory)
    target = directory / MANIFEST
    tmp = directory / (MANIFEST + ".tmp")
    body = {"format": FORMAT, "version": 1, "algorithm": "sha256", "files": dict(sorted(digests.items()))}
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def read_manifest(directory: str | os.PathLike) -> dict[str, dict] | None:
    """The manifest's ``files`` table, or None when the checkpoint has no manifest."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        files = body["files"]
        assert body.get("format") == FORMAT and isinstance(files, dict)
        for entry in files.values():
            assert isinstance(entry["size"], int) and len(entry["sha256"]) == 64
    except (ValueError, KeyError, TypeError, AssertionError):
        raise IntegrityError(f"{path} is damaged: restore the checkpoint from a good copy, or load it "
                             f"unverified with --no-verify-checkpoint") from None
    return files


def check_files(directory: str | os.PathLike, expected: dict[str, dict], names: Iterable[str]) -> str | None:
    """Verify ``names`` against the manifest table; the first problem as one line, or None."""
    directory = Path(directory)
    for name in names:
        path = directory / name
        want = expected[name]
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            kind = "truncated" if size < want["size"] else "longer than saved"
            return f"{path} is {kind} ({size} bytes, the manifest says {want['size']})"
        if file_digest(path)["sha256"] != want["sha256"]:
            return f"{path} does not match its SHA-256 in the manifest (damaged or modified)"
    return None


def problem_hint() -> str:
    return "restore the checkpoint from a good copy, or load it unverified with --no-verify-checkpoint"
