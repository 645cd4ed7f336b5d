"""bench/soak.py's fd count: pooled connections to the API are told apart from every other fd."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path
from types import ModuleType

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def load_soak() -> ModuleType:
    """bench/ is scripts, not a package: load the module from its file."""
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_connections_to_the_api_port_are_counted_apart() -> None:
    """Two connections to the API's port count as pooled; one to another port and a plain file
    count with the other fds, so a leak of either kind shows in the soak's report."""
    soak = load_soak()
    with socket.socket() as api, socket.socket() as other:
        for listener in (api, other):
            listener.bind(("127.0.0.1", 0))
            listener.listen()
        api_port, other_port = api.getsockname()[1], other.getsockname()[1]
        before = soak.count_fds(os.getpid(), api_port)
        clients = [socket.create_connection(("127.0.0.1", api_port)) for _ in range(2)]
        clients.append(socket.create_connection(("127.0.0.1", other_port)))
        with open(SOAK, "rb"):
            after = soak.count_fds(os.getpid(), api_port)
        for client in clients:
            client.close()
    assert after.api_connections - before.api_connections == 2
    assert after.other - before.other == 2  # the third client and the open file
    assert after.total == after.other + after.api_connections
