"""The key that signs audit checkpoints: from TF_AUDIT_SIGNING_KEY, or (outside production) one
made once in the data directory (docs/adr/0020-audit-chain.md, "Keys")."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from streams.contract.audit import SigningKey
from ticketflow.settings import Settings

KEY_FILE = Path("audit") / "signing-key.pem"


def development_key_path(settings: Settings) -> Path:
    return settings.data_dir.resolve() / KEY_FILE


def audit_signing_key(settings: Settings) -> SigningKey:
    """The configured key (a PEM file's path or the PEM itself). Without one, outside production,
    the data directory's key, made on first use: created exclusively (mode 0600), so processes
    starting together end up with the same key."""
    configured = (settings.audit_signing_key or "").strip()
    if configured:
        if configured.startswith("-----BEGIN"):
            return SigningKey.from_pem(configured)
        return SigningKey.from_pem(Path(configured).expanduser().read_bytes())
    if settings.env == "production":
        raise LookupError("TF_AUDIT_SIGNING_KEY must be set when TF_ENV=production")
    path = development_key_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        key = SigningKey.generate()
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key.pem())
        try:
            os.link(scratch, path)  # fails if another process made the key first
        finally:
            scratch.unlink()
    return SigningKey.from_pem(path.read_bytes())
