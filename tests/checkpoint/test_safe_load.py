"""Checkpoint bytes are unpickled through allow-lists: crafted objects are refused with one line
naming the global and the file, and nothing they would do happens."""
import io
import pickle

import numpy as np
import pytest
import torch

from modse_megatron.checkpoint.errors import CheckpointError
from modse_megatron.checkpoint.safe_load import (
    UnsafeCheckpointError,
    read_metadata_file,
    safe_torch_load,
)


class CreatesFile:
    """Unpickling this object creates ``path`` (as a malicious checkpoint would run code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _torch_bytes(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_rng_state_objects_load(tmp_path):
    """What our checkpoints store as objects (python/numpy/torch RNG states) passes."""
    import random

    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": None, "tracker": {"model-parallel-rng": torch.get_rng_state()}}
    loaded = safe_torch_load(_torch_bytes(state), "rng")
    assert loaded["random"] == state["random"]
    assert np.array_equal(loaded["numpy"][1], state["numpy"][1])
    assert torch.equal(loaded["tracker"]["model-parallel-rng"], state["torch"])


def test_crafted_torch_object_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_torch_load(_torch_bytes({"random": CreatesFile(marker)}), "rng_state/shard_0_2 (x/__0_0.distcp)")
    message = str(err.value)
    assert "\n" not in message
    assert "io.open" in message and "rng_state/shard_0_2 (x/__0_0.distcp)" in message
    assert not marker.exists()


def test_metadata_pickle_allows_dcp_classes_only(tmp_path):
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    meta = Metadata(state_dict_metadata={"w": TensorStorageMetadata(
        TensorProperties(dtype=torch.bfloat16), torch.Size([4, 2]), [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 2]))])})
    good = tmp_path / "good.metadata"
    good.write_bytes(pickle.dumps(meta))
    assert read_metadata_file(good).state_dict_metadata["w"].size == torch.Size([4, 2])

    marker = tmp_path / "pwned"
    meta.planner_data = CreatesFile(marker)
    bad = tmp_path / ".metadata"
    bad.write_bytes(pickle.dumps(meta))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*\.metadata: it holds io\.open"):
        read_metadata_file(bad)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [b"", b"\x80\x04garbage", pickle.dumps({"a": 1})[:-3]])
def test_damaged_metadata_is_one_line(tmp_path, payload):
    path = tmp_path / ".metadata"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="is damaged") as err:
        read_metadata_file(path)
    assert "\n" not in str(err.value)


def test_os_system_is_named(tmp_path):
    class Shell:
        def __reduce__(self):
            import os

            return (os.system, ("true",))

    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        safe_torch_load(_torch_bytes([Shell()]), "common.pt")
