"""Running beyond one process per kind: `--scale`, `--nats-cluster` and the settings they set."""

from __future__ import annotations

import pytest

from ticketflow.settings import Settings
from ticketflow.stack import PROCESSES, copy_metrics_ports, parse_scale, process_copies


def test_scale_names_copies_after_their_kind_and_the_apis_share_their_port() -> None:
    copies = dict(process_copies(parse_scale("inference=2, relay=2,commands=3")))
    assert copies["inference"] == copies["inference-2"] == ("worker", "inference")
    assert copies["relay-2"] == ("worker", "relay")
    assert copies["commands-3"] == ("serve", "commands", "--reuse-port")
    assert copies["commands"] == ("serve", "commands", "--reuse-port")
    assert copies["queries"] == ("serve", "queries")
    assert len(copies) == len(PROCESSES) + 1 + 1 + 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpu=2", "unknown process 'gpu'"),
        ("inference", "is not NAME=COUNT"),
        ("inference=two", "is not NAME=COUNT"),
        ("inference=0", "1 to 16 copies"),
    ],
)
def test_a_bad_scale_is_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_scale(text)


def test_stream_replicas_follow_the_cluster_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_STREAM_REPLICAS", raising=False)
    assert Settings().stream_replicas == 1
    assert Settings(nats_cluster_size=3).stream_replicas == 3
    assert Settings(nats_cluster_size=5).stream_replicas == 3
    assert Settings(nats_url="nats://a:4222,nats://b:4222,nats://c:4222").stream_replicas == 3
    assert Settings(nats_url="nats://a:4222").stream_replicas == 1
    assert Settings(nats_cluster_size=3, stream_replicas=1).stream_replicas == 1
    monkeypatch.setenv("TF_STREAM_REPLICAS", "2")
    assert Settings(nats_cluster_size=3).stream_replicas == 2


def test_the_sync_interval_is_a_duration_or_always() -> None:
    assert Settings(nats_sync_interval="always").nats_sync_interval == "always"
    assert Settings(nats_sync_interval="30s").nats_sync_interval == "30s"
    with pytest.raises(ValueError, match="nats_sync_interval"):
        Settings(nats_sync_interval="sometimes")


def test_each_copy_of_a_worker_gets_a_metrics_port_of_its_own() -> None:
    scale = parse_scale("inference=3,relay=2,ingest=2,commands=2")
    base = Settings(metrics_port=9400)
    ports = copy_metrics_ports(base, scale)
    # The first copies keep base+0..3 (relay, ingest, inference, projector); copy n adds 4(n-1).
    assert ports == {"relay-2": 9404, "ingest-2": 9405, "inference-2": 9406, "inference-3": 9410}
    assert len({9400, 9401, 9402, 9403, *ports.values()}) == 4 + len(ports)
    own = Settings(metrics_port_inference=9500)
    assert copy_metrics_ports(own, scale) == {"inference-2": 9504, "inference-3": 9508}
    assert copy_metrics_ports(Settings(), scale) == {}
    with pytest.raises(ValueError, match="no metrics port left for inference-3"):
        copy_metrics_ports(Settings(metrics_port_inference=65530), scale)
