"""ticketflow's own access tokens, under the name the CLI and older callers use.

The implementation lives in `security.tokens`, shared by both HTTP APIs.
"""

from __future__ import annotations

from security.tokens import AccessTokenCodec as JwtCodec

__all__ = ["JwtCodec"]
