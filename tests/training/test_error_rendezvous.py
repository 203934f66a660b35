"""Errors before the process group exists: every rank prints its line, then they leave together.

``modse_megatron.pretrain._error_rendezvous`` meets the other ranks in torchrun's agent store
(each sets ``modse/error/<rank>`` and waits for all); here a store served by this process
stands in for the agent's. The end-to-end check (one line per rank under torchrun) is
``tests/training/test_pretrain.py::test_bad_input_fails_fast_on_every_rank``.
"""
import threading
import time
from datetime import timedelta

import pytest

from modse_megatron import pretrain
from modse_megatron.testing.ports import master_store


@pytest.fixture
def agent_store(monkeypatch):
    """torchrun's environment for rank 0 of 2, with this process serving the agent store."""
    store = master_store()
    for key, value in {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(store.port), "WORLD_SIZE": "2", "RANK": "0",
                       "TORCHELASTIC_RESTART_COUNT": "3"}.items():
        monkeypatch.setenv(key, value)
    return store


def _in_thread(fn):
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_waits_for_every_rank_then_returns(agent_store):
    waiter = _in_thread(lambda: pretrain._error_rendezvous(seconds=60))
    agent_store.wait(["modse/attempt3/modse/error/0"], timedelta(seconds=30))  # its key, this attempt's namespace
    waiter.join(0.3)
    assert waiter.is_alive(), "rank 0 left before rank 1 reported its error"
    agent_store.set("modse/attempt3/modse/error/1", "1")  # rank 1 has printed its line
    waiter.join(30)
    assert not waiter.is_alive(), "rank 0 still waits although every rank reported"


def test_a_rank_that_never_reports_is_not_waited_for_long(agent_store):
    agent_store.set("modse/attempt2/modse/error/1", "1")  # a previous attempt's key does not count
    waiter = _in_thread(lambda: pretrain._error_rendezvous(seconds=0.5))
    waiter.join(30)
    assert not waiter.is_alive()


def test_without_an_agent_store_a_short_bounded_wait(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    pretrain._error_rendezvous(seconds=10)
    assert slept == [3.0]
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process has nobody to wait for
    pretrain._error_rendezvous(seconds=10)
    assert slept == [3.0]
