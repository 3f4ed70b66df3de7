"""Security shared by both HTTP APIs: token verification, role checks, the error envelope,
password hashing, sessions, and the request guards (limits, idempotency, body caps).

It may import only `streams.contract`; `commands/` and `read_api/` import it
(docs/adr/0009-security-package.md).
"""
