"""Reading RFC 7240's `wait` preference from `Prefer` header values."""

from __future__ import annotations

import pytest

from commands.api import preferred_wait


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], None),
        (["wait=10"], 10),
        (["WAIT = 7"], 7),
        (['wait="12"'], 12),
        (["respond-async, wait=30"], 30),
        (["return=minimal", "wait=5; foo=bar"], 5),
        (["wait=5, wait=9"], 5),
        (["handling=lenient"], None),
        (["wait=-1"], None),
        (["wait=soon"], None),
        (["wait=1.5"], None),
        (["wait=٣"], None),
        (["wait=99999999999"], 2**31),
        (["wait=" + "9" * 40], 2**31),
        (["wait=2147483649"], 2147483649),
        (["wait"], None),
    ],
)
def test_the_first_wait_preference_counts_and_a_malformed_one_is_ignored(
    values: list[str], expected: int | None
) -> None:
    assert preferred_wait(values) == expected
