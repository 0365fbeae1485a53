"""The TCP stores through which torch process groups meet: the learner ranks' rendezvous and the weight-transfer
group (learner rank 0 and every engine's TP workers).

torch's ``TCPStore`` server listens on every interface of its node (``::``) when it opens its own socket, so the
store of a training job answers anyone who can reach the node on any network (a cluster's public Ethernet as
well as the InfiniBand or private network the job uses). Here the master's socket is opened first, bound to ONE
address, the node's address as Ray knows it (``ray start --node-ip-address``; the address the other ranks
connect to), and handed to the store (``master_listen_fd``): the store listens there and nowhere else. The
other ranks connect as before. Gloo's and NCCL's own connections bind to the interface ``GLOO_SOCKET_IFNAME`` /
``NCCL_SOCKET_IFNAME`` name (or the one the hostname resolves to), not to every interface.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

__all__ = ["free_port", "node_address", "open_store"]


def node_address() -> str:
    """This node's address as Ray knows it (inside a Ray worker or driver), else ``127.0.0.1``."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def _family(host: str) -> socket.AddressFamily:
    return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0]


def free_port(host: str) -> int:
    """A TCP port currently free on ``host`` (the store binds it a moment later; ``SO_REUSEADDR`` lets it)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def open_store(host: str, port: int, world_size: int, is_master: bool, timeout: timedelta):
    """A ``TCPStore`` at ``host:port``: the master listens on ``host`` only; the others connect to it (waiting up
    to ``timeout`` for it and, for the master, for all ``world_size`` members)."""
    import torch.distributed as dist

    if not is_master:
        return dist.TCPStore(host, int(port), world_size, is_master=False, timeout=timeout)
    server = socket.create_server((host, int(port)), family=_family(host), backlog=max(128, 2 * world_size))
    fd = server.detach()  # the store owns the socket from here (and closes it)
    try:
        return dist.TCPStore(host, int(port), world_size, is_master=True, timeout=timeout, master_listen_fd=fd)
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
