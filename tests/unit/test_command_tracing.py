"""The traceparent a command's events carry when no span records the command."""

from __future__ import annotations

from commands.tracing import child_traceparent, is_traceparent

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_parent_keeps_its_trace_and_flags_with_a_new_span_id() -> None:
    child = child_traceparent(PARENT.upper())
    assert is_traceparent(child)
    assert child.split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert child.split("-")[2] != "00f067aa0ba902b7"
    assert child.endswith("-01")


def test_no_parent_or_an_invalid_one_starts_a_new_sampled_trace() -> None:
    for parent in (None, "", "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01"):
        child = child_traceparent(parent)
        assert is_traceparent(child), child
        _, trace_id, span_id, flags = child.split("-")
        assert trace_id != "0" * 32
        assert span_id != "0" * 16
        assert flags == "01"


def test_ids_do_not_repeat() -> None:
    children = [child_traceparent(None) for _ in range(2000)]
    assert len({c.split("-")[1] for c in children}) == len(children)
    assert len({c.split("-")[2] for c in children}) == len(children)
