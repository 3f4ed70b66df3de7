"""A 3-node JetStream cluster: the event stream replicated three ways survives a node's death."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from streams.jetstream import StreamSettings, ensure_stream
from tests.nats_cluster import NatsCluster
from ticketflow.bootstrap import close_nats, connect_nats
from ticketflow.embedded import NatsNode, nats_node_config
from ticketflow.nats_auth import NatsAuthority


@pytest.fixture
def cluster(tmp_path: Path, nats_authority: NatsAuthority) -> Iterator[NatsCluster]:
    cluster = NatsCluster(nats_authority, tmp_path / "cluster").start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_node_config_routes_to_the_other_nodes_and_sets_the_sync_interval(
    tmp_path: Path, nats_authority: NatsAuthority
) -> None:
    nodes = [NatsNode(f"n{n}", 4222 + n, 6222 + n, tmp_path / f"n{n}") for n in range(3)]
    config = nats_node_config(nats_authority, nodes[0], nodes, sync_interval="always")
    assert 'sync_interval: "always"' in config
    assert "nats-route://127.0.0.1:6223" in config
    assert "nats-route://127.0.0.1:6224" in config
    assert "nats-route://127.0.0.1:6222" not in config
    assert "operator: " in config
    assert "resolver_preload" in config


async def publish(js: JetStreamContext, subject: str, payload: bytes, msg_id: str) -> None:
    """Publishes, retrying while the cluster elects a new stream leader."""
    for _ in range(100):
        try:
            await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id}, timeout=2)
            return
        except (NoStreamResponseError, TimeoutError):
            await asyncio.sleep(0.2)
    raise AssertionError(f"{msg_id} was never acknowledged")


@pytest.mark.timeout(90)
async def test_an_r3_stream_keeps_every_acknowledged_message_when_its_leader_is_killed(
    cluster: NatsCluster, nats_credentials: Path
) -> None:
    nc = await connect_nats(cluster.url, "tests", nats_credentials)
    try:
        js = nc.jetstream()
        settings = StreamSettings(name="CLUSTERED", replicas=3, storage="file")
        info = await ensure_stream(js, settings)
        assert info.config.num_replicas == 3
        for n in range(50):
            await publish(js, "tf.evt.acme.ticket.x.created", b"%d" % n, f"m{n}")
        info = await js.stream_info("CLUSTERED")
        assert info.cluster is not None
        assert info.cluster.leader
        leader = cluster.index_of(info.cluster.leader)
        cluster.kill(leader)
        for n in range(50, 100):
            await publish(js, "tf.evt.acme.ticket.x.created", b"%d" % n, f"m{n}")
        cluster.restart(leader)
        for _ in range(100):
            info = await js.stream_info("CLUSTERED")
            replicas = info.cluster.replicas if info.cluster else []
            if len(replicas or []) == 2 and all(r.current for r in replicas or []):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError(f"the killed node did not catch up: {info.cluster}")
        assert info.state.messages == 100
        bodies = [(await js.get_msg("CLUSTERED", seq)).data for seq in range(1, 101)]
        assert bodies == [b"%d" % n for n in range(100)]
    finally:
        await close_nats(nc)
