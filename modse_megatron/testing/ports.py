"""Ports for test launches without the bind-then-close race.

Asking the OS for a free port, closing the socket and handing the number to another process
races with every other process on the machine: someone else may bind it in between. So:

- a store the test process owns is created on port 0 and its ``.port`` read back
  (:func:`master_store`), and workers connect to it as clients;
- single-node ``torchrun`` launches use ``--standalone`` (torchrun binds its own rendezvous
  store to port 0);
- a launch that must name a port up front (several torchrun agents meeting at one address)
  takes :func:`free_port` and retries when the port was taken meanwhile
  (:func:`address_in_use`).
"""
from __future__ import annotations

import socket
from datetime import timedelta

# What torch / torchrun print when the port they were given is taken.
_IN_USE = ("address already in use", "eaddrinuse", "errno 98", "the server socket has failed to listen")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (racy: only for launches that retry, see module doc)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def address_in_use(output: str) -> bool:
    """Whether a failed launch's output says its port was taken by someone else."""
    text = output.lower()
    return any(marker in text for marker in _IN_USE)


def master_store(host: str = "127.0.0.1", timeout: timedelta = timedelta(seconds=300)):
    """A ``TCPStore`` server in this process on a port the OS picked; workers connect to
    ``(host, store.port)`` with ``is_master=False``. Keep the object alive while they run."""
    import torch.distributed as dist

    return dist.TCPStore(host, 0, None, is_master=True, timeout=timeout, wait_for_workers=False)
