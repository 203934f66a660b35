"""Integrity manifests: written atomically, verified file by file; each kind of damage gives its
own one-line error naming the file."""
import json

import pytest
import torch

from modse_megatron.checkpoint import manifest
from modse_megatron.training.checkpointing import verify_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint-shaped directory: DCP-like files, common.pt saying it has a manifest."""
    d = tmp_path / "iter_0000003"
    d.mkdir()
    (d / "__0_0.distcp").write_bytes(bytes(range(256)) * 300)
    (d / "__1_0.distcp").write_bytes(b"rank one" * 1000)
    (d / ".metadata").write_bytes(b"index")
    torch.save({"meta": {"integrity": manifest.INTEGRITY}}, d / "common.pt")
    digests = {name: manifest.file_digest(d / name) for name in manifest.checkpoint_files(d)}
    manifest.write_manifest(d, digests)
    return d


def test_intact_checkpoint_verifies(ckpt):
    verify_checkpoint(ckpt)
    body = json.loads((ckpt / manifest.MANIFEST).read_text())
    assert set(body["files"]) == {"__0_0.distcp", "__1_0.distcp", ".metadata", "common.pt"}
    assert not list(ckpt.glob("*.tmp"))


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected", [
    (lambda d: _flip(d / "__0_0.distcp", 12345), r"__0_0\.distcp does not match its SHA-256"),
    (lambda d: (d / "__1_0.distcp").write_bytes((d / "__1_0.distcp").read_bytes()[:-10]),
     r"__1_0\.distcp is truncated \(7990 bytes, the manifest says 8000\)"),
    (lambda d: (d / ".metadata").unlink(), r"\.metadata is missing"),
    (lambda d: (d / manifest.MANIFEST).unlink(), r"modse_manifest\.json is missing but this checkpoint was saved with one"),
    (lambda d: (d / manifest.MANIFEST).write_text("{not json"), r"modse_manifest\.json is damaged"),
], ids=["flipped-byte", "truncated", "missing-file", "deleted-manifest", "damaged-manifest"])
def test_damage_is_named(ckpt, damage, expected):
    damage(ckpt)
    with pytest.raises(manifest.IntegrityError, match=expected) as err:
        verify_checkpoint(ckpt)
    assert "\n" not in str(err.value) and "--no-verify-checkpoint" in str(err.value)
    verify_checkpoint(ckpt, enabled=False)  # the escape hatch loads it anyway


def test_checkpoint_from_before_manifests_warns(ckpt, capsys):
    (ckpt / manifest.MANIFEST).unlink()
    torch.save({"meta": {}}, ckpt / "common.pt")
    verify_checkpoint(ckpt)
    assert "has no integrity manifest" in capsys.readouterr().err


def test_files_of_rank_partition():
    names = [".metadata", "__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__3_0.distcp", "common.pt", "metadata.json"]
    parts = [manifest.files_of_rank(names, r, 2) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(names)
    assert parts[1] == ["__1_0.distcp", "__3_0.distcp"]


def test_interrupted_save_is_committed(tmp_path):
    """Killed between renaming iter_N into place and updating the tracker: the complete
    directory becomes the latest checkpoint (else every resume stops at "already exists")."""
    from modse_megatron.training.checkpointing import commit_interrupted_save, latest_iteration

    for it in (30, 35):
        d = tmp_path / f"iter_{it:07d}"
        d.mkdir()
        manifest.write_manifest(d, {})
    (tmp_path / "iter_0000040").mkdir()  # no manifest: not a finished save, never committed
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("30")
    message = commit_interrupted_save(str(tmp_path))
    assert "iter_0000035 is complete but the tracker named iteration 30" in message
    assert latest_iteration(str(tmp_path)) == 35
    assert commit_interrupted_save(str(tmp_path)) is None
