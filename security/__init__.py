"""Security shared by both HTTP APIs: token verification, role checks, the error envelope, and
the request guards (limits, idempotency, body caps). Passwords and sessions are `identity/`'s.

It may import only `streams.contract`; `commands/`, `identity/` and `read_api/` import it
(docs/adr/0009-security-package.md).
"""
