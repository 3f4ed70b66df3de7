"""The write side's part in personal options: a ticket's options that its pipeline marks
`x-personal` are recorded encrypted for the user who opened the ticket, and read back with that
user's key (docs/adr/0021-crypto-shredding.md)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol
from uuid import UUID

from commands.errors import InvalidOptions
from streams import contract
from streams.contract.personal import (
    SubjectErased,
    is_encrypted,
    option_subjects,
    reveal_options,
    seal_options,
)


class SubjectKeys(Protocol):
    """Data subjects' keys, kept outside the log (`identity.subject_keys.SubjectKeyStore`)."""

    def key_for(self, tenant: str, subject: UUID) -> bytes:
        """The subject's key, created on first use; raises `SubjectErased` once erased."""
        ...

    def keys(self, tenant: str, subjects: Iterable[UUID]) -> dict[UUID, bytes | None]:
        """Existing keys: bytes, or None for an erased subject; unknown subjects left out."""
        ...


def subject_of_owner(owner: str, pipeline: contract.PipelineDefinition) -> UUID:
    """The data subject of a ticket's personal options: the user who opens it."""
    try:
        return UUID(owner)
    except ValueError:
        name = sorted(pipeline.personal_options)[0]
        raise InvalidOptions(
            f"Option {name!r} is personal data; only a user can pass it (the ticket's owner"
            f" must be a user id, not {owner!r}).",
            option=name,
        ) from None


def seal(
    keys: SubjectKeys,
    options: Mapping[str, Any],
    pipeline: contract.PipelineDefinition,
    *,
    tenant: str,
    ticket_id: UUID,
    subjects: Mapping[str, UUID],
) -> dict[str, Any]:
    """`options` as recorded: each personal option encrypted for its subject (`subjects`: option
    name → subject, one for every personal option that has a value)."""
    sealed = dict(options)
    for name in sorted(pipeline.personal_options):
        if sealed.get(name) is None:
            continue
        subject = subjects[name]
        try:
            key = keys.key_for(tenant, subject)
        except SubjectErased:
            raise InvalidOptions(
                f"Option {name!r} is personal data of an erased user.", option=name
            ) from None
        sealed = seal_options(
            sealed, (name,), key, tenant=tenant, subject=subject, ticket_id=ticket_id
        )
    return sealed


def reveal(
    keys: SubjectKeys,
    options: Mapping[str, Any],
    pipeline: contract.PipelineDefinition,
    *,
    tenant: str,
    ticket_id: UUID,
) -> dict[str, Any]:
    """The options as the user passed them: personal ones decrypted, or `[erased]`."""
    personal = pipeline.personal_options
    subjects = option_subjects(options, personal)
    if not subjects:
        return dict(options)
    return reveal_options(
        options, personal, keys.keys(tenant, subjects), tenant=tenant, ticket_id=ticket_id
    )


def value_subjects(
    options: Mapping[str, Any], pipeline: contract.PipelineDefinition
) -> dict[str, UUID]:
    """Option name → the subject its recorded (encrypted) value belongs to."""
    found = {}
    for name in pipeline.personal_options:
        value = options.get(name)
        if is_encrypted(value):
            assert isinstance(value, Mapping)
            found[name] = UUID(str(value["subject"]))
    return found


def rerun_options(
    keys: SubjectKeys,
    original: Mapping[str, Any],
    pipeline: contract.PipelineDefinition,
    *,
    tenant: str,
    ticket_id: UUID,
) -> tuple[dict[str, Any], dict[str, UUID]]:
    """The options a re-run of a ticket passes again, decrypted, and the subject of each
    personal one: a value keeps the subject it was recorded for. A value whose subject was
    erased is left out: nothing can bring it back."""
    origin = value_subjects(original, pipeline)
    if not origin:
        return dict(original), {}
    known = keys.keys(tenant, set(origin.values()))
    erased = {name for name, subject in origin.items() if known.get(subject) is None}
    revealed = reveal_options(
        original, pipeline.personal_options, known, tenant=tenant, ticket_id=ticket_id
    )
    kept = {name: value for name, value in revealed.items() if name not in erased}
    return kept, {name: subject for name, subject in origin.items() if name not in erased}
