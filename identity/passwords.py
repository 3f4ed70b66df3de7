"""Password rules and hashing (Argon2id): what a password must be, and how it is kept.

Passwords are compared and hashed in Unicode NFKC form, so the same password typed on another
keyboard (composed or decomposed accents, full-width digits) still matches. The rules follow
NIST SP 800-63B: a minimum length, a generous maximum, no composition rules.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

# Long enough for any passphrase, short enough that hashing stays cheap for an attacker's input.
MAX_PASSWORD_LENGTH = 256


class WeakPassword(ValueError):
    """A new password that breaks the rules; the message says which rule."""


@dataclass(frozen=True)
class HashParameters:
    """Argon2id cost. The defaults are RFC 9106's second recommendation (64 MiB, 3 passes)."""

    time_cost: int = 3
    memory_kib: int = 64 * 1024
    parallelism: int = 4


def normalise(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


class Passwords:
    """Checks new passwords against the rules, hashes them and verifies attempts.

    `verify` costs the same whether or not the account exists: for an unknown account call
    `verify(None, attempt)`, which hashes against a fixed dummy hash.
    """

    def __init__(self, *, min_length: int = 12, parameters: HashParameters | None = None) -> None:
        if not 8 <= min_length <= MAX_PASSWORD_LENGTH:
            raise ValueError(f"min_length must be 8-{MAX_PASSWORD_LENGTH}")
        self.min_length = min_length
        self.parameters = parameters or HashParameters()
        self._hasher = PasswordHasher(
            time_cost=self.parameters.time_cost,
            memory_cost=self.parameters.memory_kib,
            parallelism=self.parameters.parallelism,
            type=Type.ID,
        )
        self._dummy_hash = self._hasher.hash("not a password anyone has")

    def check(self, password: str) -> str:
        """The password in the form that is hashed; raises `WeakPassword` if it breaks a rule."""
        normalised = normalise(password)
        if len(normalised) < self.min_length:
            raise WeakPassword(f"A password needs at least {self.min_length} characters.")
        if len(normalised) > MAX_PASSWORD_LENGTH:
            raise WeakPassword(f"A password may have at most {MAX_PASSWORD_LENGTH} characters.")
        if not normalised.strip():
            raise WeakPassword("A password cannot be only spaces.")
        if len(set(normalised)) < 3:
            raise WeakPassword("A password needs at least three different characters.")
        return normalised

    def hash(self, password: str) -> str:
        """The Argon2id hash of a new password that follows the rules."""
        return self._hasher.hash(self.check(password))

    def verify(self, password_hash: str | None, attempt: str) -> bool:
        """Whether `attempt` is the password of `password_hash` (None: an unknown account)."""
        # Bounded before hashing: an attacker's megabyte "password" must not cost a megabyte.
        candidate = normalise(attempt[: MAX_PASSWORD_LENGTH * 4])
        try:
            self._hasher.verify(password_hash or self._dummy_hash, candidate)
        except (VerificationError, InvalidHashError):
            return False
        return password_hash is not None

    def needs_rehash(self, password_hash: str) -> bool:
        """Whether the hash was made with other parameters than today's."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except (InvalidHashError, ValueError):
            return True
