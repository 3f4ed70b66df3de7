"""Aggregate events derived from the event contract, so that each event is defined once.

An aggregate's event class is built from the contract's payload model (`streams.contract`): its
stored fields are the payload's fields in the payload's order, less the aggregate's id (the
event's `originator_id`) and what the aggregate's base event already declares (`tenant`), then
the payload's private fields (`EventType.private_fields`: stored, never published); its `TOPIC`
is the contract's. The stored topic and state of every event are those of the hand-written
classes they replace, byte for byte, so history loads as before.

Aggregates record events with `emit` and `create`, which take a contract payload (validated when
it was built) and find its event class: no field list is written twice, and no event can be
recorded under another event's topic.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from eventsourcing.domain import Aggregate

from streams import contract

A = TypeVar("A", bound=Aggregate)

_BY_PAYLOAD: dict[type[contract.ContractPayload], type[Any]] = {}


def event_class(
    base: type[Aggregate.Event],
    payload: type[contract.ContractPayload],
    *,
    created: bool = False,
    apply: Callable[[Any, Any], None] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> type[Any]:
    """The `eventsourcing` event class of `payload` for the aggregate whose base event is `base`.

    `created`: the aggregate's creation event (also an `Aggregate.Created`). `apply(event,
    aggregate)`: how the event changes the aggregate. `extra`: more class attributes (e.g. a
    property that reads an older version as the current one).
    """
    event_type = contract.event_type_of(payload)
    inherited = {field.name for field in dataclasses.fields(base)}
    own = [
        name
        for name in payload.model_fields
        if name != event_type.id_field and name not in inherited
    ]
    own += sorted(event_type.private_fields)
    name = _class_name(event_type, created)
    namespace: dict[str, Any] = {
        "__annotations__": dict.fromkeys(own, Any),
        "__module__": base.__module__,
        "__qualname__": f"{base.__qualname__.rsplit('.', 1)[0]}.{name}",
        "__doc__": f"{event_type.description} (`{event_type.topic}`)",
        "TOPIC": event_type.topic,
        **(extra or {}),
    }
    if apply is not None:
        namespace["apply"] = apply
    bases: tuple[type, ...] = (base, Aggregate.Created) if created else (base,)
    cls = types.new_class(name, bases, exec_body=lambda ns: ns.update(namespace))
    _BY_PAYLOAD[payload] = cls
    return cls


def emit(
    aggregate: Aggregate,
    payload: contract.ContractPayload,
    traceparent: str | None,
    **private: Any,
) -> None:
    """Records `payload` as the aggregate's next event (with its private fields)."""
    aggregate.trigger_event(
        _event_class_of(payload, private), traceparent=traceparent, **_fields(payload), **private
    )


def create(
    cls: type[A], payload: contract.ContractPayload, traceparent: str | None, **private: Any
) -> A:
    """A new aggregate whose first event is `payload` (its id is the payload's id field)."""
    event_type = contract.event_type_of(payload)
    return cls._create(
        _event_class_of(payload, private),
        id=getattr(payload, event_type.id_field),
        traceparent=traceparent,
        **_fields(payload),
        **private,
    )


def _event_class_of(payload: contract.ContractPayload, private: Mapping[str, Any]) -> type[Any]:
    event_type = contract.event_type_of(payload)
    if set(private) != event_type.private_fields:
        raise TypeError(
            f"{event_type.topic} stores the private fields {sorted(event_type.private_fields)},"
            f" not {sorted(private)}"
        )
    try:
        return _BY_PAYLOAD[type(payload)]
    except KeyError:
        raise TypeError(f"no aggregate records {event_type.topic}") from None


def _fields(payload: contract.ContractPayload) -> dict[str, Any]:
    return payload.model_dump(mode="json", exclude={contract.event_type_of(payload).id_field})


def _class_name(event_type: contract.EventType, created: bool) -> str:
    if created:
        return "Created"
    name = "".join(part.title() for part in event_type.name.split("_"))
    version = event_type.topic.rsplit(".", 1)[1]
    latest = max(
        t.topic.rsplit(".", 1)[1]
        for t in contract.EVENT_TYPES
        if t.name == event_type.name and t.aggregate == event_type.aggregate
    )
    return name if version == latest else f"{name}{version.upper()}"
