"""The stores of the learner rendezvous and of the weight-transfer group listen on the node's address only, not
on every interface (torch's own ``TCPStore`` server listens on ``::``)."""

from __future__ import annotations

import threading
from datetime import timedelta

import psutil

from ivgr_dist.runtime.rendezvous import free_port, open_store


def _listening(port: int) -> set[str]:
    return {
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == "LISTEN" and c.laddr.port == port
    }


def test_the_master_store_listens_on_the_given_address_only_and_the_others_reach_it():
    port = free_port("127.0.0.1")
    stores = {}
    master = threading.Thread(
        target=lambda: stores.update(master=open_store("127.0.0.1", port, 2, True, timedelta(seconds=30)))
    )
    master.start()
    client = open_store("127.0.0.1", port, 2, False, timedelta(seconds=30))
    master.join(timeout=30)
    assert "master" in stores
    assert _listening(port) == {"127.0.0.1"}  # torch alone: {"::"}, every interface of the node
    client.set("k", "v")
    assert stores["master"].get("k") == b"v"


def test_the_weight_transfer_group_host_listens_on_its_address_only():
    from ivgr_dist.sync.collective import open_group

    port = free_port("127.0.0.1")
    group = open_group("127.0.0.1", port, 0, 1, "gloo", timeout_s=10)
    assert group.size() == 1
    assert _listening(port) == {"127.0.0.1"}
