"""Who may connect to NATS and what they may do there: NATS decentralized (operator mode) auth.

The server trusts one operator key. The operator signs three accounts: `SYS` (the server's own),
`TICKETFLOW` (JetStream, where every ticketflow process connects with the service credentials)
and `INTEGRATORS` (no JetStream; it imports the event subjects `tf.evt.>` from `TICKETFLOW`).
An integrator's credentials are a user of `INTEGRATORS` signed by that account's signing key:
they may subscribe to their own tenant's subjects and nothing else, and they expire. Minting
them needs only the signing key, so the command API does it at run time and the server is never
reconfigured. See docs/adr/0010-nats-authorization.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing
import nkeys

from streams.contract.identity import is_tenant_slug
from streams.contract.subjects import PREFIX, tenant_filter

logger = logging.getLogger(__name__)

JWT_ALGORITHM = "ed25519-nkey"
CLAIMS_VERSION = 2
NO_LIMIT = -1
MAX_INTEGRATOR_TTL = timedelta(days=366)

# The directory under the data directory where the embedded server's keys live.
AUTH_DIR = "nats-auth"

_PREFIXES = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}
_CREDENTIALS_RE = re.compile(
    r"-----BEGIN NATS USER JWT-----\s*(?P<jwt>[\w\-.=]+)\s*------END NATS USER JWT------.*?"
    r"-----BEGIN USER NKEY SEED-----\s*(?P<seed>SU[A-Z2-7]+)\s*------END USER NKEY SEED------",
    re.DOTALL,
)


class InvalidNatsJwt(ValueError):
    """A token that is not a NATS JWT, or whose signature does not match its issuer."""


class NatsAccessRefused(ConnectionRefusedError):
    """The NATS server refused the credentials (or their absence) at connect."""

    def __init__(self, url: str, name: str, had_credentials: bool) -> None:
        hint = (
            "the credentials were refused: expired, or signed by keys this server does not trust"
            if had_credentials
            else "the server requires credentials; set TF_NATS_CREDENTIALS to a .creds file"
        )
        super().__init__(f"NATS at {url} refused {name}: {hint}")


# --- nkeys -------------------------------------------------------------------------------------


def new_seed(role: str) -> str:
    """A fresh nkey seed for an `operator`, `account` or `user` key (`SO…`, `SA…`, `SU…`)."""
    encoded: bytes = nkeys.encode_seed(secrets.token_bytes(32), _PREFIXES[role])
    return encoded.decode()


def public_key(seed: str) -> str:
    """The public key (`O…`, `A…`, `U…`) of a seed."""
    try:
        key: bytes = nkeys.from_seed(seed.strip().encode()).public_key
    except nkeys.NkeysError as error:
        raise ValueError(f"not an nkey seed: {error}") from None
    return key.decode()


def _raw_public_key(public: str) -> tuple[int, bytes]:
    """The role byte and the 32-byte ed25519 key of an encoded public key, checksum checked."""
    try:
        decoded = base64.b32decode(public + "=" * (-len(public) % 8))
    except (binascii.Error, ValueError):
        raise InvalidNatsJwt(f"not a public nkey: {public!r}") from None
    if len(decoded) != 35:
        raise InvalidNatsJwt(f"not a public nkey: {public!r}")
    body, checksum = decoded[:-2], decoded[-2:]
    if nkeys.crc16_checksum(body) != checksum:
        raise InvalidNatsJwt(f"bad checksum in public nkey {public!r}")
    return body[0], body[1:]


def _role_of(public: str) -> str:
    prefix, _ = _raw_public_key(public)
    for role, byte in _PREFIXES.items():
        if byte == prefix:
            return role
    raise InvalidNatsJwt(f"unexpected key role in {public!r}")


# --- JWTs --------------------------------------------------------------------------------------


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidNatsJwt("malformed base64 in token") from None


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def encode_jwt(claims: Mapping[str, Any], signer_seed: str, *, now: float | None = None) -> str:
    """Sign NATS claims (JWT v2, `ed25519-nkey`) with an nkey.

    Sets `iss` (the signer's public key), `iat` and `jti` (a hash of the claims) as the NATS JWT
    library does; `sub`, `name`, `exp` and the `nats` section come from `claims`.
    """
    signer = nkeys.from_seed(signer_seed.strip().encode())
    body = {key: value for key, value in claims.items() if key != "jti"}
    body["iss"] = signer.public_key.decode()
    body["iat"] = int(time.time() if now is None else now)
    digest = hashlib.sha256(_json(body)).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signed = f"{_b64encode(_json({'typ': 'JWT', 'alg': JWT_ALGORITHM}))}.{_b64encode(_json(body))}"
    signature: bytes = signer.sign(signed.encode())
    return f"{signed}.{_b64encode(signature)}"


def decode_jwt(token: str, *, verify: bool = True) -> dict[str, Any]:
    """The claims of a NATS JWT; with `verify`, only if its issuer's key signed it."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise InvalidNatsJwt("a JWT has three parts")
    try:
        header = json.loads(_b64decode(parts[0]))
        claims = json.loads(_b64decode(parts[1]))
    except ValueError:
        raise InvalidNatsJwt("malformed JSON in token") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidNatsJwt("malformed token")
    if str(header.get("typ", "")).upper() != "JWT" or header.get("alg") != JWT_ALGORITHM:
        raise InvalidNatsJwt(f"unsupported token header {header}")
    if verify:
        issuer = claims.get("iss")
        if not isinstance(issuer, str):
            raise InvalidNatsJwt("token has no issuer")
        _, raw = _raw_public_key(issuer)
        try:
            nacl.signing.VerifyKey(raw).verify(
                f"{parts[0]}.{parts[1]}".encode(), _b64decode(parts[2])
            )
        except (nacl.exceptions.BadSignatureError, ValueError):
            raise InvalidNatsJwt("signature does not match the issuer") from None
    return claims


def format_credentials(user_jwt: str, user_seed: str) -> str:
    """A `.creds` file, as `nsc` writes it and every NATS client reads it."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n"
        "\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n"
        "\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed}\n"
        "------END USER NKEY SEED------\n"
        "\n"
        "*************************************************************\n"
    )


def parse_credentials(text: str) -> tuple[str, str]:
    """The user JWT and user seed of a `.creds` file."""
    match = _CREDENTIALS_RE.search(text)
    if match is None:
        raise ValueError("not a NATS credentials file")
    return match["jwt"], match["seed"]


# --- claims ------------------------------------------------------------------------------------


def operator_claims(operator: str, name: str, *, system_account: str) -> dict[str, Any]:
    return {
        "sub": operator,
        "name": name,
        "nats": {
            "system_account": system_account,
            "type": "operator",
            "version": CLAIMS_VERSION,
        },
    }


def account_claims(
    account: str,
    name: str,
    *,
    jetstream: bool = False,
    signing_keys: Iterable[str] = (),
    exports: Iterable[Mapping[str, Any]] = (),
    imports: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    limits: dict[str, Any] = {
        "subs": NO_LIMIT,
        "data": NO_LIMIT,
        "payload": NO_LIMIT,
        "imports": NO_LIMIT,
        "exports": NO_LIMIT,
        "wildcards": True,
        "conn": NO_LIMIT,
        "leaf": NO_LIMIT,
    }
    if jetstream:
        # Non-zero storage is what enables JetStream for an account; -1 means no limit.
        limits |= {
            "mem_storage": NO_LIMIT,
            "disk_storage": NO_LIMIT,
            "streams": NO_LIMIT,
            "consumer": NO_LIMIT,
        }
    nats: dict[str, Any] = {"limits": limits, "type": "account", "version": CLAIMS_VERSION}
    if signing_keys := sorted(signing_keys):
        nats["signing_keys"] = signing_keys
    if exports := [dict(e) for e in exports]:
        nats["exports"] = exports
    if imports := [dict(i) for i in imports]:
        nats["imports"] = imports
    return {"sub": account, "name": name, "nats": nats}


def user_claims(
    user: str,
    name: str,
    *,
    issuer_account: str | None = None,
    permissions: Mapping[str, Any] | None = None,
    expires_at: int | None = None,
    tags: Iterable[str] = (),
) -> dict[str, Any]:
    nats: dict[str, Any] = {
        "subs": NO_LIMIT,
        "data": NO_LIMIT,
        "payload": NO_LIMIT,
        "type": "user",
        "version": CLAIMS_VERSION,
    }
    if permissions:
        nats |= dict(permissions)
    if issuer_account:
        nats["issuer_account"] = issuer_account
    if tags := [t.lower() for t in tags]:
        nats["tags"] = tags
    claims: dict[str, Any] = {"sub": user, "name": name, "nats": nats}
    if expires_at is not None:
        claims["exp"] = expires_at
    return claims


def integrator_permissions(tenant: str) -> dict[str, Any]:
    """Subscribe to one tenant's events; publish nothing (an empty allow list would allow all)."""
    return {"pub": {"deny": [">"]}, "sub": {"allow": [tenant_filter(tenant)]}}


# --- integrator credentials --------------------------------------------------------------------


@dataclass(frozen=True)
class IntegratorSigner:
    """The key that signs integrator users: the integrator account's own or a signing key of it.

    `account` is the integrator account's public key; it goes into each user's `issuer_account`
    when `seed` is a signing key rather than the account's identity key.
    """

    seed: str = field(repr=False)
    account: str

    def __post_init__(self) -> None:
        if not self.seed.strip().startswith("SA"):
            raise ValueError("the integrator signing key must be an account seed (SA…)")
        if _role_of(self.account) != "account":
            raise ValueError(f"{self.account!r} is not an account public key (A…)")

    @classmethod
    def load(cls, seed_file: Path, account: str | None = None) -> IntegratorSigner:
        """From a seed file (`.nk`); without `account`, the seed is the account's own key."""
        seed = seed_file.read_text().strip()
        return cls(seed, account or public_key(seed))

    def credentials(
        self, tenant: str, name: str, ttl: timedelta, *, now: float | None = None
    ) -> str:
        return integrator_credentials(tenant, name, ttl, signer=self, now=now)


def integrator_credentials(
    tenant: str,
    name: str,
    ttl: timedelta,
    *,
    signer: IntegratorSigner,
    now: float | None = None,
) -> str:
    """A `.creds` file for one integrator of `tenant`: subscribe to `tf.evt.<tenant>.>` only.

    Every call makes a new user key, so credentials are never shared between integrators.
    """
    if not is_tenant_slug(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-63 characters of a-z, 0-9 and '-'")
    if not timedelta(0) < ttl <= MAX_INTEGRATOR_TTL:
        raise ValueError(
            f"the lifetime must be between 1 second and {MAX_INTEGRATOR_TTL.days} days"
        )
    issued = time.time() if now is None else now
    user_seed = new_seed("user")
    user = public_key(user_seed)
    signing_key = public_key(signer.seed)
    claims = user_claims(
        user,
        f"{tenant}/{name}",
        issuer_account=signer.account if signer.account != signing_key else None,
        permissions=integrator_permissions(tenant),
        expires_at=int(issued + ttl.total_seconds()),
        tags=(f"tenant:{tenant}", "role:integrator"),
    )
    token = encode_jwt(claims, signer.seed, now=issued)
    logger.info(
        "minted NATS credentials for integrator %r of tenant %s: user %s, valid %s",
        name,
        tenant,
        user,
        ttl,
    )
    return format_credentials(token, user_seed)


_TTL_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_ttl(text: str) -> timedelta:
    """`90s`, `15m`, `12h`, `30d`, `2w` (plain numbers are seconds)."""
    match = _TTL_RE.match(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a lifetime like 30d, 12h, 15m or 90s")
    return timedelta(seconds=int(match[1]) * _TTL_UNITS[match[2]])


# --- the embedded server's authority ------------------------------------------------------------


_KEY_FILES = {
    "operator": ("operator.nk", "operator"),
    "system": ("system.nk", "account"),
    "service_account": ("ticketflow.nk", "account"),
    "integrator_account": ("integrators.nk", "account"),
    "integrator_signing": ("integrators-signing.nk", "account"),
    "service_user": ("service.nk", "user"),
}


def write_private(path: Path, text: str) -> None:
    """Write a secret atomically, readable by its owner only (0600)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class NatsAuthority:
    """The operator, accounts and service user of a NATS server ticketflow runs itself.

    Keys are made once per directory and reused, so credentials stay valid across restarts.
    """

    directory: Path
    seeds: Mapping[str, str] = field(repr=False)

    @classmethod
    def load(cls, directory: Path) -> NatsAuthority:
        """The keys under `directory`; raises `FileNotFoundError` when they were never made."""
        seeds = {
            key: (directory / file).read_text().strip() for key, (file, _) in _KEY_FILES.items()
        }
        return cls(directory, seeds)

    @classmethod
    def load_or_create(cls, directory: Path) -> NatsAuthority:
        """Load the keys, making any that is missing, and write what the server reads."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        for file, role in _KEY_FILES.values():
            if not (directory / file).exists():
                write_private(directory / file, new_seed(role) + "\n")
        authority = cls.load(directory)
        authority._write_server_files()
        return authority

    def _public(self, key: str) -> str:
        return public_key(self.seeds[key])

    @property
    def operator(self) -> str:
        return self._public("operator")

    @property
    def system_account(self) -> str:
        return self._public("system")

    @property
    def service_account(self) -> str:
        return self._public("service_account")

    @property
    def integrator_account(self) -> str:
        return self._public("integrator_account")

    @property
    def service_credentials(self) -> Path:
        """The `.creds` file every ticketflow process connects with."""
        return self.directory / "service.creds"

    @property
    def integrator_seed_file(self) -> Path:
        """The integrator account's signing key, which mints integrator credentials."""
        return self.directory / _KEY_FILES["integrator_signing"][0]

    @property
    def server_config(self) -> Path:
        """The server's authorization configuration (`nats-server -c`)."""
        return self.directory / "server.conf"

    def signer(self) -> IntegratorSigner:
        return IntegratorSigner(self.seeds["integrator_signing"], self.integrator_account)

    def account_jwts(self) -> dict[str, str]:
        """Every account's JWT, signed by the operator, keyed by the account's public key."""
        operator_seed = self.seeds["operator"]
        events = {"name": "events", "subject": f"{PREFIX}.>", "type": "stream"}
        claims = [
            account_claims(self.system_account, "SYS"),
            account_claims(self.service_account, "TICKETFLOW", jetstream=True, exports=[events]),
            account_claims(
                self.integrator_account,
                "INTEGRATORS",
                signing_keys=[self._public("integrator_signing")],
                imports=[events | {"account": self.service_account}],
            ),
        ]
        return {c["sub"]: encode_jwt(c, operator_seed) for c in claims}

    def service_user_credentials(self) -> str:
        claims = user_claims(self._public("service_user"), "ticketflow-service")
        token = encode_jwt(claims, self.seeds["service_account"])
        return format_credentials(token, self.seeds["service_user"])

    def _write_server_files(self) -> None:
        operator_jwt = encode_jwt(
            operator_claims(self.operator, "ticketflow", system_account=self.system_account),
            self.seeds["operator"],
        )
        (self.directory / "operator.jwt").write_text(operator_jwt + "\n")
        preload = "\n".join(f"  {key}: {jwt}" for key, jwt in self.account_jwts().items())
        write_private(
            self.server_config,
            "# Written by ticketflow at start-up from the keys beside it; edits are lost.\n"
            f"operator: {json.dumps(str(self.directory / 'operator.jwt'))}\n"
            f"system_account: {self.system_account}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{\n{preload}\n}}\n",
        )
        write_private(self.service_credentials, self.service_user_credentials())
