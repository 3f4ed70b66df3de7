"""The AsyncAPI 3.0 document of the event stream, generated from the event contract.

Nothing here is written per event: every entry of `EVENT_TYPES` becomes a message (its CloudEvents
headers and its payload's JSON Schema), every subject pattern a channel with its parameters, and
every channel a `receive` operation. The headers every message carries are the list `HEADERS`;
a new header is one more entry there (and the relay that sets it).

The document is the same wherever it is produced: `ticketflow contract asyncapi`, the query API's
`GET /asyncapi.json`, and the released copies kept next to this module (`asyncapi-<version>.json`)
that `ticketflow contract check` compares today's document with.

Payload schemas are the payload models' JSON Schemas with three generic changes, so that the
AsyncAPI Schema Object (a superset of JSON Schema draft-07) accepts them: `$defs` move to
`components.schemas` (and `$ref`s with them), pydantic's OpenAPI-style `discriminator` object
becomes the property name AsyncAPI expects, and `additionalProperties: false` is dropped from
the payload objects, because fields may be added to a topic at any time (see the evolution rules
in `info.description`) and a consumer that validates with this document must accept them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from streams.contract.events import EVENT_TYPES, EventType
from streams.contract.identity import TENANT_PATTERN
from streams.contract.subjects import PREFIX, STREAM_SUBJECTS

ASYNCAPI_VERSION = "3.0.0"
DOCUMENT_ID = "urn:ticketflow:events"
UUID_PATTERN = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
CE_SOURCE_PREFIX = "/ticketflow/"
"""`ce-source` is `/ticketflow/<tenant>` (the relay's `CE_SOURCE`)."""
RELEASED_DIR = Path(__file__).parent
"""Where the documents of past releases are kept, as `asyncapi-<version>.json`."""

# The stream the relay publishes to (streams/jetstream.py, ticketflow/settings.py). Only what
# holds in every deployment is stated; replicas and maximum age are set per deployment.
STREAM_NAME = "TF_EVENTS"
DUPLICATE_WINDOW = "PT2M"
DEFAULT_MAX_AGE = "P30D"

Schema = dict[str, Any]
HeaderSchema = Mapping[str, Any] | Callable[[EventType], Mapping[str, Any]]


@dataclass(frozen=True)
class Header:
    """One message header: its name, what it means, its JSON Schema (or a function of the
    event type that gives it) and whether every message carries it."""

    name: str
    description: str
    schema: HeaderSchema
    required: bool = True

    def schema_for(self, event_type: EventType) -> Schema:
        schema = self.schema(event_type) if callable(self.schema) else self.schema
        return {"type": "string", **schema, "description": self.description}


def _id_pattern(_: EventType) -> Mapping[str, Any]:
    return {"pattern": f"^{UUID_PATTERN}:[1-9][0-9]*$"}


HEADERS: tuple[Header, ...] = (
    Header("ce-specversion", "CloudEvents version.", {"const": "1.0"}),
    Header("ce-id", "Event id, `<aggregate_id>:<version>`; the same on every redelivery: "
           "drop a message whose `ce-id` you have already handled.", _id_pattern),
    Header("ce-type", "The event's stable topic: says which payload schema the body follows.",
           lambda t: {"const": t.topic}),
    Header("ce-source", "`/ticketflow/<tenant>`.",
           {"pattern": f"^{CE_SOURCE_PREFIX}{TENANT_PATTERN[1:]}"}),
    Header("ce-subject", "The aggregate the event belongs to, `<aggregate>/<aggregate_id>`.",
           lambda t: {"pattern": f"^{t.aggregate}/{UUID_PATTERN}$"}),
    Header("ce-time", "When the event was recorded (RFC 3339, UTC).", {"format": "date-time"}),
    Header("content-type", "CloudEvents `datacontenttype` of the body.",
           {"const": "application/json"}),
    Header("Nats-Msg-Id", "JetStream de-duplication id; equal to `ce-id`.", _id_pattern),
    Header("traceparent", "W3C trace context of the command that caused the event; absent "
           "when that command was not traced.",
           {"pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"}, required=False),
    Header("tf-position", "The event's global position in the event log: increases with every "
           "event, in the order the stream delivers them.", {"pattern": "^[1-9][0-9]*$"}),
    Header("tf-version", "The aggregate's version after the event (1 for its first event).",
           {"pattern": "^[1-9][0-9]*$"}),
    Header("tf-hash", "The event's link in its tenant's hash chain (hex sha256 of `tf-prev-hash` "
           "and the event's canonical bytes, docs/adr/0020-audit-chain.md). Absent on messages "
           "published before the chain existed.", {"pattern": "^[0-9a-f]{64}$"}, required=False),
    Header("tf-prev-hash", "`tf-hash` of the tenant's previous event (64 zeros for its first): "
           "equal to the last `tf-hash` you received from the tenant unless you missed an "
           "event.", {"pattern": "^[0-9a-f]{64}$"}, required=False),
)  # fmt: skip
"""Every header the relay sets, in one list: add a header with one entry here."""

EVOLUTION = """\
## Evolution

- Within one `ce-type` (e.g. `ticketflow.ticket.completed.v1`) ticketflow may, without notice:
  add optional payload fields and headers, add enum values, add new event types (new
  messages, on new or existing channels) and add aggregates. Consumers ignore what they do not
  know.
- Anything else is a breaking change and comes as a new topic version on the same subject
  (`….v2`, a new `ce-type` and message here): removing or renaming a field, changing its type,
  making a field required, removing an enum value. Events keep the type they were recorded
  with: the old `….v1` message stays in this document for as long as such events exist.
- A consumer that meets a `ce-type` it does not know (a new event, or a version newer than it
  handles) logs it and skips it, or parks it for later; it never crashes and never stops
  consuming.
- `ticketflow contract check OLD.json` compares this document with an older one and lists
  every breaking change; the document of each release is kept in the repository
  (`streams/contract/asyncapi-<version>.json`).
"""

STREAM_NOTES = f"""\
## Stream and delivery

Every event is published, in the event log's global order, to JetStream stream
`{STREAM_NAME}` (subjects `{STREAM_SUBJECTS[0]}`, limits retention, file storage, maximum age
{DEFAULT_MAX_AGE} unless the deployment sets another, duplicate window {DUPLICATE_WINDOW}).
Integrator credentials allow core NATS subscriptions to `{PREFIX}.<tenant>.>` (queue groups
included) and nothing else: they do not reach the JetStream API.

- **Ordering**: messages arrive in `tf-position` order. A consumer that keeps the last
  `tf-position` it handled notices a gap (it was disconnected) and reads what it missed from the
  query API (`GET /events?after=<tf-position>`), then goes on.
- **De-duplication**: a message may come twice (after a relay restart, or a replay);
  `ce-id` (equal to `Nats-Msg-Id`) identifies the event: handle each `ce-id` once.
- **Durable consumers** (processes with JetStream access to `{STREAM_NAME}`, such as
  ticketflow's own workers): a durable pull consumer with explicit acks, `filter_subject`
  narrowed to the events it handles, `deliver_policy` `all` (or `by_start_sequence` to
  resume), `max_ack_pending` bounding work in flight, and the same de-duplication by `ce-id`.
"""


def contract_version() -> str:
    """The version of the contract: the version of the installed ticketflow package."""
    try:
        return metadata.version("ticketflow")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def released_document_path(version: str) -> Path:
    return RELEASED_DIR / f"asyncapi-{version}.json"


def headers_schema(event_type: EventType, headers: Iterable[Header] = HEADERS) -> Schema:
    """JSON Schema of the headers of `event_type`'s messages. Other headers may be present."""
    headers = tuple(headers)
    return {
        "type": "object",
        "properties": {header.name: header.schema_for(event_type) for header in headers},
        "required": [header.name for header in headers if header.required],
        "additionalProperties": True,
    }


# -- payload schemas ------------------------------------------------------------------------------

REF_TEMPLATE = "#/components/schemas/{model}"


def _adapt(schema: Any, *, top: bool) -> Any:
    """A pydantic JSON Schema made fit for the AsyncAPI Schema Object (see the module's doc)."""
    if isinstance(schema, list):
        return [_adapt(item, top=False) for item in schema]
    if not isinstance(schema, dict):
        return schema
    adapted: Schema = {}
    for key, value in schema.items():
        if key == "discriminator" and isinstance(value, dict):
            adapted[key] = value["propertyName"]
        elif key in {"properties", "$defs", "patternProperties"}:
            adapted[key] = {name: _adapt(item, top=False) for name, item in value.items()}
        else:
            adapted[key] = _adapt(value, top=False)
    if top and adapted.get("additionalProperties") is False:
        del adapted["additionalProperties"]
    return adapted


def payload_schemas() -> tuple[dict[str, str], Schema]:
    """(the schema name of each topic, every schema by name: payloads and what they use)."""
    names: dict[str, str] = {}
    schemas: Schema = {}

    def add(name: str, schema: Schema) -> None:
        if name in schemas and schemas[name] != schema:
            raise ValueError(f"two different payload schemas are both named {name}")
        schemas[name] = schema

    for event_type in EVENT_TYPES:
        raw = event_type.payload.model_json_schema(ref_template=REF_TEMPLATE)
        for name, definition in raw.pop("$defs", {}).items():
            add(name, _adapt(definition, top=False))
        name = event_type.payload.__name__
        add(name, _adapt({**raw, "description": event_type.description}, top=True))
        names[event_type.topic] = name
    return names, schemas


# -- the document ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Channel:
    """One subject pattern: `tf.evt.{tenant}.<aggregate>.{<aggregate>_id}.<event name>`."""

    aggregate: str
    name: str
    event_types: tuple[EventType, ...]

    @property
    def id(self) -> str:
        return f"{self.aggregate}.{self.name}"

    @property
    def id_parameter(self) -> str:
        return f"{self.aggregate}_id"

    @property
    def address(self) -> str:
        return f"{PREFIX}.{{tenant}}.{self.aggregate}.{{{self.id_parameter}}}.{self.name}"

    @property
    def operation_id(self) -> str:
        return f"receive.{self.id}"


def channels() -> list[Channel]:
    """Every subject pattern, in contract order, with the event types (topic versions) on it."""
    grouped: dict[tuple[str, str], list[EventType]] = {}
    for event_type in EVENT_TYPES:
        grouped.setdefault((event_type.aggregate, event_type.name), []).append(event_type)
    return [Channel(aggregate, name, tuple(types)) for (aggregate, name), types in grouped.items()]


def _parameters(aggregates: Iterable[str]) -> Schema:
    parameters: Schema = {
        "tenant": {
            "description": f"Tenant slug, matching `{TENANT_PATTERN}`.",
            "examples": ["acme"],
            "location": "$message.payload#/tenant",
            "x-pattern": TENANT_PATTERN,
        }
    }
    for aggregate in aggregates:
        parameters[f"{aggregate}_id"] = {
            "description": f"The {aggregate}'s id, a UUID (lower case).",
            "examples": ["6f1c2d9e-8a4b-4c3d-9e2f-1a2b3c4d5e6f"],
            "location": f"$message.payload#/{aggregate}_id",
            "x-pattern": f"^{UUID_PATTERN}$",
        }
    return parameters


def _message(event_type: EventType, schema_name: str) -> Schema:
    return {
        "name": event_type.topic,
        "title": schema_name,
        "summary": event_type.description,
        "contentType": "application/json",
        "headers": headers_schema(event_type),
        "payload": {"$ref": f"#/components/schemas/{schema_name}"},
        "x-ce-type": event_type.topic,
    }


def _stream_extension() -> Schema:
    return {
        "stream": {
            "name": STREAM_NAME,
            "subjects": list(STREAM_SUBJECTS),
            "retention": "limits",
            "storage": "file",
            "duplicateWindow": DUPLICATE_WINDOW,
            "maxAge": DEFAULT_MAX_AGE,
            "maxAgeSetting": "TF_STREAM_MAX_AGE_DAYS",
            "replicasSetting": "TF_STREAM_REPLICAS",
        },
        "subscription": f"{PREFIX}.{{tenant}}.>",
        "ordering": {"header": "tf-position", "scope": "global, per stream"},
        "deduplication": {"header": "ce-id", "natsHeader": "Nats-Msg-Id"},
        "durableConsumer": {
            "ackPolicy": "explicit",
            "deliverPolicy": "all",
            "filterSubject": f"{PREFIX}.{{tenant}}.<aggregate>.*.<event>",
            "note": "for processes with JetStream access; integrator credentials have none",
        },
        "unknownTypes": "log and skip, or park; never crash",
        "gapRecovery": "GET /events?after=<tf-position> on the query API",
    }


def asyncapi_document() -> Schema:
    """The AsyncAPI 3.0 document of every event ticketflow publishes."""
    schema_names, schemas = payload_schemas()
    all_channels = channels()
    aggregates = list(dict.fromkeys(channel.aggregate for channel in all_channels))
    description = (
        "Every event ticketflow records, published on NATS as CloudEvents 1.0 in binary mode: "
        "the CloudEvents attributes are `ce-*` headers and the body is the event's JSON "
        f"payload. Subjects are `{PREFIX}.<tenant>.<aggregate>.<aggregate_id>.<event>`; "
        f"integrators subscribe to `{PREFIX}.<tenant>.>`. Each message's `ce-type` names its "
        "payload schema.\n\n" + STREAM_NOTES + "\n" + EVOLUTION
    )
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": DOCUMENT_ID,
        "info": {
            "title": "ticketflow events",
            "version": contract_version(),
            "description": description,
            "license": {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
            "tags": [{"name": aggregate} for aggregate in aggregates],
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": "{host}",
                "protocol": "nats",
                "description": (
                    "The deployment's NATS server. Connect with the `.creds` file of "
                    "`POST /integrations/nats-credentials` or `ticketflow nats credentials`."
                ),
                "variables": {
                    "host": {
                        "default": "127.0.0.1:4222",
                        "description": "host:port; the default is the embedded development "
                        "stack's.",
                    }
                },
                "security": [{"$ref": "#/components/securitySchemes/natsCredentials"}],
            }
        },
        "channels": {
            channel.id: {
                "address": channel.address,
                "title": f"{channel.aggregate} {channel.name}",
                "description": " ".join(t.description for t in channel.event_types),
                "parameters": {
                    "tenant": {"$ref": "#/components/parameters/tenant"},
                    channel.id_parameter: {
                        "$ref": f"#/components/parameters/{channel.id_parameter}"
                    },
                },
                "messages": {
                    t.topic: {"$ref": f"#/components/messages/{t.topic}"}
                    for t in channel.event_types
                },
                "servers": [{"$ref": "#/servers/nats"}],
                "tags": [{"name": channel.aggregate}],
            }
            for channel in all_channels
        },
        "operations": {
            channel.operation_id: {
                "action": "receive",
                "title": f"Receive {channel.aggregate} {channel.name}",
                "summary": f"Events `{channel.name}` of a {channel.aggregate}.",
                "channel": {"$ref": f"#/channels/{channel.id}"},
                "messages": [
                    {"$ref": f"#/channels/{channel.id}/messages/{t.topic}"}
                    for t in channel.event_types
                ],
                "tags": [{"name": channel.aggregate}],
            }
            for channel in all_channels
        },
        "components": {
            "schemas": schemas,
            "messages": {t.topic: _message(t, schema_names[t.topic]) for t in EVENT_TYPES},
            "parameters": _parameters(aggregates),
            "securitySchemes": {
                "natsCredentials": {
                    "type": "asymmetricEncryption",
                    "description": (
                        "NATS decentralized authentication: a `.creds` file holding a user JWT "
                        "for one tenant and its nkey seed, which signs the server's nonce."
                    ),
                }
            },
        },
        "x-ticketflow": _stream_extension(),
    }


def asyncapi_json(document: Mapping[str, Any] | None = None) -> str:
    """The document as the JSON that is served, printed and kept for releases."""
    return json.dumps(document or asyncapi_document(), indent=2, ensure_ascii=False) + "\n"


@functools.cache
def asyncapi_bytes() -> bytes:
    """Today's document as UTF-8 JSON, made once per process."""
    return asyncapi_json().encode()


__all__ = [
    "HEADERS",
    "Header",
    "asyncapi_bytes",
    "asyncapi_document",
    "asyncapi_json",
    "channels",
    "headers_schema",
    "released_document_path",
]
