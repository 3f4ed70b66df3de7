"""Running beyond one process per kind: `--scale`, `--nats-cluster` and the settings they set."""

from __future__ import annotations

import pytest

from ticketflow.settings import Settings
from ticketflow.stack import PROCESSES, parse_scale, process_copies


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
