"""Password rules and Argon2id hashing."""

from __future__ import annotations

import pytest

from identity.passwords import MAX_PASSWORD_LENGTH, HashParameters, Passwords, WeakPassword

CHEAP = HashParameters(time_cost=1, memory_kib=8 * 1024, parallelism=1)
GOOD = "correct horse battery staple"


@pytest.fixture(scope="module")
def passwords() -> Passwords:
    return Passwords(min_length=12, parameters=CHEAP)


def test_a_hashed_password_verifies_and_another_does_not(passwords: Passwords) -> None:
    hashed = passwords.hash(GOOD)
    assert passwords.verify(hashed, GOOD)
    assert not passwords.verify(hashed, GOOD + "!")


def test_the_hash_is_argon2id_and_does_not_contain_the_password(passwords: Passwords) -> None:
    hashed = passwords.hash(GOOD)
    assert hashed.startswith("$argon2id$")
    assert GOOD not in hashed


def test_the_same_password_hashes_differently_each_time(passwords: Passwords) -> None:
    assert passwords.hash(GOOD) != passwords.hash(GOOD)


def test_an_unknown_account_never_verifies(passwords: Passwords) -> None:
    assert not passwords.verify(None, "not a password anyone has")
    assert not passwords.verify(None, GOOD)


def test_a_garbled_hash_does_not_verify(passwords: Passwords) -> None:
    assert not passwords.verify("$argon2id$garbage", GOOD)


@pytest.mark.parametrize(
    ("password", "rule"),
    [
        ("short", "at least 12"),
        ("x" * (MAX_PASSWORD_LENGTH + 1), "at most"),
        (" " * 20, "only spaces"),
        ("abababababababab", "three different"),
    ],
)
def test_a_password_that_breaks_a_rule_is_refused(
    passwords: Passwords, password: str, rule: str
) -> None:
    with pytest.raises(WeakPassword, match=rule):
        passwords.hash(password)


def test_the_minimum_length_is_counted_in_characters_not_bytes(passwords: Passwords) -> None:
    assert passwords.check("пароль-пароль") == "пароль-пароль"


def test_passwords_compare_in_nfkc_form(passwords: Passwords) -> None:
    composed = "café au lait, s'il vous plaît"
    decomposed = composed.replace("é", "e\u0301").replace("î", "i\u0302")
    assert passwords.verify(passwords.hash(composed), decomposed)
    full_width = "".join(chr(ord(c) + 0xFEE0) for c in "password12345")
    assert passwords.verify(passwords.hash("password12345"), full_width)


def test_a_hash_made_with_other_parameters_needs_rehashing(passwords: Passwords) -> None:
    stronger = Passwords(parameters=HashParameters(time_cost=2, memory_kib=8 * 1024, parallelism=1))
    hashed = passwords.hash(GOOD)
    assert not passwords.needs_rehash(hashed)
    assert stronger.needs_rehash(hashed)
    assert stronger.verify(hashed, GOOD)


def test_a_minimum_below_eight_is_refused() -> None:
    with pytest.raises(ValueError, match="min_length"):
        Passwords(min_length=6)
