"""Access tokens and the authenticator: claims, algorithms, revocation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from security.tokens import AccessTokenCodec, Authenticator
from streams.contract.identity import AuthenticationError

SECRET = "s" * 40
codec = AccessTokenCodec(SECRET, issuer="ticketflow", audience="ticketflow", ttl_s=900)


class FakeRevocationList:
    """Revoked token and session ids, in memory."""

    def __init__(self) -> None:
        self.revoked: set[str] = set()

    async def is_revoked(self, token_id: str | None, session_id: str | None) -> bool:
        return bool({token_id, session_id} & self.revoked)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(claims: dict[str, object], key: bytes) -> str:
    """An HS256 token signed by hand, with any key (pyjwt refuses PEM keys as HMAC secrets)."""
    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + "."
        + b64(json.dumps(claims).encode())
    )
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "sub": "alice",
        "tenant": "acme",
        "roles": ["user"],
        "iss": "ticketflow",
        "aud": "ticketflow",
        "iat": now,
        "nbf": now,
        "exp": now + 60,
        "jti": "j1",
    }
    return base | overrides


def test_an_issued_token_carries_every_claim() -> None:
    issued = codec.issue(subject="u1", tenant="acme", roles=["user"], session_id="s1")
    decoded = jwt.decode(issued.token, SECRET, algorithms=["HS256"], audience="ticketflow")
    assert {"iss", "aud", "exp", "iat", "nbf", "jti", "sub", "tenant", "roles", "sid"} <= set(
        decoded
    )
    assert decoded["exp"] - decoded["iat"] == 900 == issued.expires_in
    assert decoded["jti"] == issued.token_id


def test_a_verified_token_says_which_token_and_session_it_is() -> None:
    issued = codec.issue(subject="u1", tenant="acme", roles=["admin"], session_id="s1")
    principal = codec.verify(issued.token)
    assert principal.token_id == issued.token_id
    assert principal.session_id == "s1"
    assert principal.expires_at == issued.expires_at
    assert principal.issuer == "ticketflow"


def test_every_token_has_its_own_id() -> None:
    first = codec.issue(subject="u1", tenant="acme", roles=["user"])
    second = codec.issue(subject="u1", tenant="acme", roles=["user"])
    assert first.token_id != second.token_id


def test_unknown_roles_cannot_be_minted() -> None:
    with pytest.raises(ValueError, match="unknown roles"):
        codec.issue(subject="u1", tenant="acme", roles=["root"])


async def test_the_authenticator_accepts_our_token() -> None:
    authenticate = Authenticator(codec, FakeRevocationList())
    principal = await authenticate(codec.mint(subject="u1", tenant="acme", roles=["user"]))
    assert (principal.subject, principal.tenant) == ("u1", "acme")
    assert principal.roles == frozenset({"user"})


async def test_a_revoked_token_is_refused() -> None:
    revocations = FakeRevocationList()
    authenticate = Authenticator(codec, revocations)
    issued = codec.issue(subject="u1", tenant="acme", roles=["user"])
    revocations.revoked.add(issued.token_id)
    with pytest.raises(AuthenticationError, match="revoked"):
        await authenticate(issued.token)


async def test_a_token_of_a_revoked_session_is_refused() -> None:
    revocations = FakeRevocationList()
    authenticate = Authenticator(codec, revocations)
    issued = codec.issue(subject="u1", tenant="acme", roles=["user"], session_id="family-1")
    revocations.revoked.add("family-1")
    with pytest.raises(AuthenticationError, match="revoked"):
        await authenticate(issued.token)


async def test_an_unsigned_token_is_refused() -> None:
    authenticate = Authenticator(codec, FakeRevocationList())
    with pytest.raises(AuthenticationError, match="'none' not accepted"):
        await authenticate(jwt.encode(claims(), "", algorithm="none"))


async def test_an_rs256_token_is_refused_without_an_identity_provider() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    authenticate = Authenticator(codec, FakeRevocationList())
    with pytest.raises(AuthenticationError, match="'RS256' not accepted"):
        await authenticate(jwt.encode(claims(), key, algorithm="RS256"))


async def test_an_hs256_token_signed_with_a_public_key_is_refused() -> None:
    public_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    authenticate = Authenticator(codec, FakeRevocationList())
    with pytest.raises(AuthenticationError, match="Signature verification failed"):
        await authenticate(hand_signed_hs256(claims(), public_pem))


async def test_garbage_is_refused() -> None:
    authenticate = Authenticator(codec, FakeRevocationList())
    with pytest.raises(AuthenticationError):
        await authenticate("not-a-token")


@pytest.mark.parametrize("subject", ["", "   ", "a" * 256, "alice\nbob", "tab\there"])
def test_a_token_whose_user_id_cannot_own_a_ticket_is_refused(subject: str) -> None:
    token = jwt.encode(claims(sub=subject), SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationError, match="sub claim"):
        codec.verify(token)
    with pytest.raises(ValueError, match="printable characters"):
        codec.mint(subject=subject, tenant="acme", roles=["user"])


def test_a_user_id_of_any_script_up_to_255_characters_is_accepted() -> None:
    for subject in ("u1", "Ålice Müller", "用户-7", "a" * 255):
        token = jwt.encode(claims(sub=subject), SECRET, algorithm="HS256")
        assert codec.verify(token).subject == subject


def test_a_token_that_is_not_valid_yet_is_refused() -> None:
    token = jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationError, match="not yet valid"):
        codec.verify(token)


def test_a_token_from_another_issuer_is_refused() -> None:
    token = jwt.encode(claims(iss="someone-else"), SECRET, algorithm="HS256")
    with pytest.raises(AuthenticationError, match="issuer"):
        codec.verify(token)


async def test_a_token_revoked_after_it_was_accepted_is_refused() -> None:
    """A token accepted once is not verified again, but its revocation is checked every time."""
    revocations = FakeRevocationList()
    authenticate = Authenticator(codec, revocations)
    issued = codec.issue(subject="u1", tenant="acme", roles=["user"])
    assert (await authenticate(issued.token)).subject == "u1"
    assert (await authenticate(issued.token)).subject == "u1"
    revocations.revoked.add(issued.token_id)
    with pytest.raises(AuthenticationError, match="revoked"):
        await authenticate(issued.token)


def test_a_token_accepted_before_is_refused_once_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    own = AccessTokenCodec(SECRET, issuer="ticketflow", audience="ticketflow")
    token = own.mint(subject="u1", tenant="acme", roles=["user"], ttl_s=60)
    assert own.verify(token).subject == "u1"
    assert own.verified_before(token) is not None
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    # Past its `exp` the token is not taken from what verified before; `verify` decodes it
    # again, and PyJWT refuses it as expired (see test_auth.py).
    assert own.verified_before(token) is None
    assert token not in own._verified._entries


def test_a_changed_token_is_verified_afresh() -> None:
    own = AccessTokenCodec(SECRET, issuer="ticketflow", audience="ticketflow")
    token = own.mint(subject="u1", tenant="acme", roles=["admin"])
    own.verify(token)
    header, payload, signature = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged["sub"] = "u2"
    other = f"{header}.{b64(json.dumps(forged).encode())}.{signature}"
    assert own.verified_before(other) is None
    with pytest.raises(AuthenticationError, match=r"[Ss]ignature"):
        own.verify(other)


def test_the_verified_tokens_stay_bounded() -> None:
    own = AccessTokenCodec(SECRET, issuer="ticketflow", audience="ticketflow")
    tokens = [own.mint(subject=f"u{i}", tenant="acme", roles=["user"]) for i in range(5000)]
    for token in tokens:
        own.verify(token)
    assert own.verified_before(tokens[0]) is None
    assert own.verified_before(tokens[-1]) is not None
    assert len(own._verified._entries) <= own._verified.LIMIT
