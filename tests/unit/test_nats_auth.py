"""NATS JWTs and credentials: encoding, signatures, claims, and the embedded server's keys."""

from __future__ import annotations

import base64
import json
import stat
import time
from datetime import timedelta
from pathlib import Path

import nacl.signing
import nkeys
import pytest

from ticketflow.nats_auth import (
    MAX_INTEGRATOR_TTL,
    IntegratorSigner,
    InvalidNatsJwt,
    NatsAuthority,
    decode_jwt,
    encode_jwt,
    integrator_credentials,
    new_seed,
    parse_credentials,
    parse_ttl,
    public_key,
    user_claims,
)


def _segment(token: str, index: int) -> dict[str, object]:
    part = token.split(".")[index]
    decoded: dict[str, object] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


@pytest.fixture
def signer() -> IntegratorSigner:
    account_seed, signing_seed = new_seed("account"), new_seed("account")
    return IntegratorSigner(signing_seed, public_key(account_seed))


def test_seeds_and_public_keys_carry_their_role() -> None:
    assert new_seed("operator").startswith("SO")
    assert public_key(new_seed("operator")).startswith("O")
    assert public_key(new_seed("account")).startswith("A")
    assert public_key(new_seed("user")).startswith("U")


def test_a_jwt_has_the_nats_header_and_an_ed25519_signature_by_its_issuer() -> None:
    seed = new_seed("account")
    token = encode_jwt({"sub": "UABC", "name": "x"}, seed)

    assert _segment(token, 0) == {"typ": "JWT", "alg": "ed25519-nkey"}
    header, payload, signature = token.split(".")
    raw_public = base64.b32decode(public_key(seed) + "=" * (-len(public_key(seed)) % 8))[1:33]
    nacl.signing.VerifyKey(raw_public).verify(
        f"{header}.{payload}".encode(), base64.urlsafe_b64decode(signature + "==")
    )
    # And nkeys, the library NATS clients sign with, agrees.
    assert nkeys.from_seed(seed.encode()).verify(
        f"{header}.{payload}".encode(), base64.urlsafe_b64decode(signature + "==")
    )


def test_encoding_sets_issuer_issued_at_and_an_id() -> None:
    seed = new_seed("account")
    claims = decode_jwt(encode_jwt({"sub": "UABC", "jti": "ignored"}, seed, now=1_700_000_000))

    assert claims["iss"] == public_key(seed)
    assert claims["iat"] == 1_700_000_000
    assert claims["sub"] == "UABC"
    assert isinstance(claims["jti"], str)
    assert len(claims["jti"]) == 52
    assert claims["jti"] != "ignored"


def test_a_changed_payload_fails_verification() -> None:
    token = encode_jwt(user_claims("UABC", "x"), new_seed("account"))
    header, payload, signature = token.split(".")
    claims = _segment(token, 1)
    claims["nats"] = {"sub": {"allow": [">"]}}
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()

    with pytest.raises(InvalidNatsJwt):
        decode_jwt(f"{header}.{forged}.{signature}")
    assert decode_jwt(f"{header}.{forged}.{signature}", verify=False)["nats"] == claims["nats"]
    assert payload != forged


def test_a_token_signed_by_another_key_than_its_issuer_fails_verification() -> None:
    token = encode_jwt({"sub": "UABC"}, new_seed("account"))
    other = encode_jwt({"sub": "UABC"}, new_seed("account"))

    with pytest.raises(InvalidNatsJwt):
        decode_jwt(".".join([*token.split(".")[:2], other.split(".")[2]]))


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c", "e30.e30.AA"])
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(InvalidNatsJwt):
        decode_jwt(token)


def test_integrator_credentials_may_subscribe_to_their_tenant_and_publish_nothing(
    signer: IntegratorSigner,
) -> None:
    text = integrator_credentials("acme", "crm-sync", timedelta(days=30), signer=signer, now=1000)
    token, seed = parse_credentials(text)
    claims = decode_jwt(token)
    nats = claims["nats"]

    assert claims["sub"] == public_key(seed)
    assert seed.startswith("SU")
    assert claims["iss"] == public_key(signer.seed)
    assert nats["issuer_account"] == signer.account
    assert nats["type"] == "user"
    assert nats["version"] == 2
    assert nats["sub"] == {"allow": ["tf.evt.acme.>"]}
    assert nats["pub"] == {"deny": [">"]}
    assert "resp" not in nats
    assert claims["iat"] == 1000
    assert claims["exp"] == 1000 + 30 * 86400
    assert claims["name"] == "acme/crm-sync"
    assert nats["tags"] == ["tenant:acme", "role:integrator"]


def test_every_credentials_file_has_a_user_key_of_its_own(signer: IntegratorSigner) -> None:
    first = parse_credentials(signer.credentials("acme", "a", timedelta(hours=1)))
    second = parse_credentials(signer.credentials("acme", "a", timedelta(hours=1)))

    assert first[1] != second[1]


def test_credentials_signed_by_the_account_key_itself_name_no_issuer_account() -> None:
    account_seed = new_seed("account")
    signer = IntegratorSigner(account_seed, public_key(account_seed))
    token, _ = parse_credentials(signer.credentials("acme", "a", timedelta(hours=1)))

    assert "issuer_account" not in decode_jwt(token)["nats"]


@pytest.mark.parametrize("tenant", ["", "ACME", "acme.>", "*", "acme other", "a" * 64, ">"])
def test_credentials_are_refused_for_anything_but_a_tenant_slug(
    signer: IntegratorSigner, tenant: str
) -> None:
    with pytest.raises(ValueError, match="tenant"):
        signer.credentials(tenant, "x", timedelta(hours=1))


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-1), MAX_INTEGRATOR_TTL * 2])
def test_credentials_always_expire_within_the_limit(
    signer: IntegratorSigner, ttl: timedelta
) -> None:
    with pytest.raises(ValueError, match="lifetime"):
        signer.credentials("acme", "x", ttl)


def test_a_signer_needs_an_account_seed_and_an_account_public_key() -> None:
    with pytest.raises(ValueError, match="account seed"):
        IntegratorSigner(new_seed("user"), public_key(new_seed("account")))
    with pytest.raises(ValueError, match="account public key"):
        IntegratorSigner(new_seed("account"), public_key(new_seed("operator")))


def test_a_signer_loads_from_a_seed_file(tmp_path: Path) -> None:
    seed = new_seed("account")
    (tmp_path / "key.nk").write_text(seed + "\n")

    assert IntegratorSigner.load(tmp_path / "key.nk") == IntegratorSigner(seed, public_key(seed))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("2w", 1209600)],
)
def test_lifetimes_read_with_units(text: str, seconds: int) -> None:
    assert parse_ttl(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "d", "1y", "-1d", "1.5h"])
def test_unreadable_lifetimes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="lifetime"):
        parse_ttl(text)


def test_parse_credentials_refuses_other_text() -> None:
    with pytest.raises(ValueError, match="credentials"):
        parse_credentials("not a creds file")


def test_the_authority_makes_private_keys_once_and_reuses_them(tmp_path: Path) -> None:
    first = NatsAuthority.load_or_create(tmp_path / "auth")
    second = NatsAuthority.load_or_create(tmp_path / "auth")

    assert first.seeds == second.seeds
    assert stat.S_IMODE((tmp_path / "auth").stat().st_mode) == 0o700
    for path in (tmp_path / "auth").iterdir():
        if path.name != "operator.jwt":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert first.integrator_seed_file.read_text().strip().startswith("SA")


def test_the_authority_signs_accounts_with_the_operator_and_the_service_user_with_its_account(
    tmp_path: Path,
) -> None:
    authority = NatsAuthority.load_or_create(tmp_path)
    accounts = {key: decode_jwt(jwt) for key, jwt in authority.account_jwts().items()}
    service_jwt, service_seed = parse_credentials(authority.service_credentials.read_text())
    service = decode_jwt(service_jwt)

    assert {claims["iss"] for claims in accounts.values()} == {authority.operator}
    by_name = {claims["name"]: claims["nats"] for claims in accounts.values()}
    assert set(by_name) == {"SYS", "TICKETFLOW", "INTEGRATORS"}
    assert by_name["TICKETFLOW"]["limits"]["disk_storage"] == -1
    assert "disk_storage" not in by_name["INTEGRATORS"]["limits"]
    assert "disk_storage" not in by_name["SYS"]["limits"]
    assert by_name["TICKETFLOW"]["exports"] == [
        {"name": "events", "subject": "tf.evt.>", "type": "stream"}
    ]
    assert by_name["INTEGRATORS"]["imports"] == [
        {
            "name": "events",
            "subject": "tf.evt.>",
            "type": "stream",
            "account": authority.service_account,
        }
    ]
    assert by_name["INTEGRATORS"]["signing_keys"] == [public_key(authority.signer().seed)]
    assert service["iss"] == authority.service_account
    assert service["sub"] == public_key(service_seed)
    assert "exp" not in service
    assert "pub" not in service["nats"]


def test_the_server_configuration_trusts_the_operator_and_preloads_every_account(
    tmp_path: Path,
) -> None:
    authority = NatsAuthority.load_or_create(tmp_path)
    config = authority.server_config.read_text()
    operator = decode_jwt((tmp_path / "operator.jwt").read_text())

    assert operator["iss"] == operator["sub"] == authority.operator
    assert operator["nats"]["system_account"] == authority.system_account
    assert "resolver: MEMORY" in config
    assert f"system_account: {authority.system_account}" in config
    for account, jwt in authority.account_jwts().items():
        assert f"  {account}: " in config
        assert decode_jwt(jwt)["sub"] == account


def test_loading_an_authority_that_was_never_made_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        NatsAuthority.load(tmp_path)


def test_integrator_credentials_expire_relative_to_now() -> None:
    account = new_seed("account")
    signer = IntegratorSigner(account, public_key(account))
    token, _ = parse_credentials(signer.credentials("acme", "x", timedelta(minutes=5)))

    assert abs(decode_jwt(token)["exp"] - (time.time() + 300)) < 5
