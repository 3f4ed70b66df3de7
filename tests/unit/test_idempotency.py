"""Request fingerprints for idempotent retries: the same request hashes the same however it is
encoded, and a different one does not."""

from __future__ import annotations

from security.idempotency import request_fingerprint

Part = tuple[str, str | None, str | None, bytes]
"""name, filename, content type, content"""

DOCUMENT: Part = ("file", "paper.pdf", "application/pdf", b"%PDF-1.7 one")
PIPELINE: Part = ("pipeline", None, None, b"document-review")


def multipart(boundary: str, parts: list[Part]) -> bytes:
    body = b""
    for name, filename, content_type, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if content_type is not None:
            body += f"Content-Type: {content_type}\r\n".encode()
        body += b"\r\n" + content + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def scope(
    path: str = "/tickets", content_type: str = "", method: str = "POST"
) -> dict[str, object]:
    headers = [(b"content-type", content_type.encode())] if content_type else []
    return {"type": "http", "method": method, "path": path, "query_string": b"", "headers": headers}


async def form_fingerprint(parts: list[Part], boundary: str = "b1", path: str = "/tickets") -> str:
    content_type = f"multipart/form-data; boundary={boundary}"
    return await request_fingerprint(scope(path, content_type), multipart(boundary, parts))


async def test_the_same_form_with_another_boundary_has_the_same_fingerprint() -> None:
    first = await form_fingerprint([DOCUMENT, PIPELINE], boundary="----a1b2")
    again = await form_fingerprint([DOCUMENT, PIPELINE], boundary="----zz99-other")
    assert first == again


async def test_fields_with_different_names_may_come_in_any_order() -> None:
    assert await form_fingerprint([DOCUMENT, PIPELINE]) == await form_fingerprint(
        [PIPELINE, DOCUMENT]
    )


async def test_the_order_of_fields_sharing_a_name_counts() -> None:
    one: Part = ("files", "a.pdf", "application/pdf", b"a")
    two: Part = ("files", "b.pdf", "application/pdf", b"b")
    assert await form_fingerprint([one, two]) != await form_fingerprint([two, one])


async def test_another_document_content_changes_the_fingerprint() -> None:
    other: Part = ("file", "paper.pdf", "application/pdf", b"%PDF-1.7 two")
    assert await form_fingerprint([DOCUMENT]) != await form_fingerprint([other])


async def test_another_file_name_or_media_type_changes_the_fingerprint() -> None:
    renamed: Part = ("file", "other.pdf", "application/pdf", DOCUMENT[3])
    retyped: Part = ("file", "paper.pdf", "application/octet-stream", DOCUMENT[3])
    first = await form_fingerprint([DOCUMENT])
    assert first != await form_fingerprint([renamed])
    assert first != await form_fingerprint([retyped])


async def test_the_same_form_on_another_path_has_another_fingerprint() -> None:
    assert await form_fingerprint([DOCUMENT], path="/tickets") != await form_fingerprint(
        [DOCUMENT], path="/other"
    )


async def test_other_bodies_are_fingerprinted_by_method_path_and_bytes() -> None:
    cancel = scope("/tickets/6f1c/cancel")
    assert await request_fingerprint(cancel, b"") == await request_fingerprint(cancel, b"")
    assert await request_fingerprint(cancel, b"") != await request_fingerprint(
        scope("/tickets/7a2d/cancel"), b""
    )
    json_scope = scope("/search", "application/json")
    assert await request_fingerprint(json_scope, b'{"q": 1}') != await request_fingerprint(
        json_scope, b'{"q": 2}'
    )


async def test_a_form_that_does_not_parse_is_fingerprinted_by_its_bytes() -> None:
    broken = scope(content_type="multipart/form-data; boundary=b1")
    assert await request_fingerprint(broken, b"--b1\r\nnonsense") != await request_fingerprint(
        broken, b"--b1\r\nother nonsense"
    )
