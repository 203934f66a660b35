"""Supervision helpers: one-line error writes, collective-failure detection, per-attempt stores."""
from datetime import timedelta

import pytest
import torch.distributed as dist

from modse_megatron.testing.ports import master_store
from modse_megatron.training.supervision import (attempt_store, is_collective_failure, launched_by_torchrun,
                                                 start_orphan_watchdog, write_error_line)


def test_error_line_is_one_line(capfd):
    write_error_line("modse-pretrain: error: first\nsecond")
    assert capfd.readouterr().err == "modse-pretrain: error: first second\n"


@pytest.mark.parametrize("err, expected", [
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Timed out waiting 60000ms for recv operation"), True),
    (RuntimeError("Connection closed by peer [127.0.0.1]:4242"), True),
    (dist.DistError("a collective failed"), True),
    (dist.DistStoreError("key not found"), False),  # a store problem is not a lost peer
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("Timed out"), False),
])
def test_collective_failures_are_recognised(err, expected):
    assert is_collective_failure(err) is expected


def test_no_torchrun_no_agent_store_no_watchdog(monkeypatch):
    for key in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    assert not launched_by_torchrun()
    assert attempt_store(timedelta(seconds=5)) is None
    assert start_orphan_watchdog() is None


def test_each_restart_attempt_gets_its_own_namespace(monkeypatch):
    store = master_store()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for attempt in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        attempt_store(timedelta(seconds=5)).set("rank0/addr", attempt)
    assert store.get("modse/attempt0/rank0/addr") == b"0"
    assert store.get("modse/attempt1/rank0/addr") == b"1"  # the first attempt's address is not reused
