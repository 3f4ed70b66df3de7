# ruff: noqa: RUF001 - Cyrillic characters are the test data
"""The sentence-transformers embedder against the real all-MiniLM-L6-v2 model on CPU."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence

import pytest
import pytest_asyncio

from inference.embeddings import SentenceTransformerEmbedder

# Each test well within 120 s on a loaded 2-core machine, the first with loading the model.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest_asyncio.fixture(scope="module")
async def embedder() -> AsyncIterator[SentenceTransformerEmbedder]:
    model = SentenceTransformerEmbedder(batch_size=8).load()
    yield model
    await model.aclose()


def dot(left: Sequence[float], right: Sequence[float]) -> float:
    return sum(a * b for a, b in zip(left, right, strict=True))


async def test_vectors_have_384_dimensions(embedder: SentenceTransformerEmbedder) -> None:
    vectors = await embedder.embed(["The results support the conclusion."])

    assert embedder.dimension == 384
    assert [len(v) for v in vectors] == [384]


async def test_vectors_have_unit_norm(embedder: SentenceTransformerEmbedder) -> None:
    vectors = await embedder.embed(["short", "A much longer sentence about methods and results."])

    assert all(math.isclose(math.sqrt(dot(v, v)), 1.0, abs_tol=1e-5) for v in vectors)


async def test_a_paraphrase_is_closer_than_an_unrelated_sentence(
    embedder: SentenceTransformerEmbedder,
) -> None:
    anchor, paraphrase, unrelated = await embedder.embed(
        [
            "The cat is sleeping on the sofa.",
            "A cat naps on the couch.",
            "The stock market fell sharply today.",
        ]
    )

    assert dot(anchor, paraphrase) > dot(anchor, unrelated) + 0.3


async def test_russian_text_embeds_and_a_paraphrase_is_closer(
    embedder: SentenceTransformerEmbedder,
) -> None:
    anchor, paraphrase, unrelated = await embedder.embed(
        ["Кошка спит на диване.", "Кот дремлет на диване.", "Курс доллара вырос на бирже."]
    )

    assert len(anchor) == 384
    assert math.isclose(dot(anchor, anchor), 1.0, abs_tol=1e-5)
    assert dot(anchor, paraphrase) > dot(anchor, unrelated)


async def test_more_texts_than_a_batch_keep_their_order(
    embedder: SentenceTransformerEmbedder,
) -> None:
    texts = [f"Sentence number {n} about topic {n % 3}." for n in range(20)]

    together = await embedder.embed(texts)
    alone = await embedder.embed([texts[13]])

    assert len(together) == 20
    assert dot(together[13], alone[0]) > 0.9999


async def test_no_texts_give_no_vectors(embedder: SentenceTransformerEmbedder) -> None:
    assert await embedder.embed([]) == []
