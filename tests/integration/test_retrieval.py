"""Chunk storage and hybrid search against real PostgreSQL with pgvector."""

from __future__ import annotations

import asyncio
import math
import random
import secrets
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest

from inference.retrieval import (
    EMBEDDING_DIMENSIONS,
    ChunkRecord,
    ChunkStore,
    DocumentStats,
    RetrievedChunk,
    vector_literal,
)
from tests.conftest import Servers
from tests.support import random_tenant

# Embeddings are synthetic: unit vectors along chosen axes, so cosine distances are known exactly
# (0 along the same axis, 1 between different axes) and each test controls which chunk the vector
# ranking prefers.

# An axis no test stores a chunk along: a query along it is equally far from every chunk, so the
# vector ranking carries no preference and only the full-text ranking decides.
NOWHERE = EMBEDDING_DIMENSIONS - 1
SECTION_HEADING = "Раздел 2 \N{SINGLE RIGHT-POINTING ANGLE QUOTATION MARK} Срок действия"


def axis(*weights: tuple[int, float]) -> list[float]:
    """A unit vector with the given weights on the given axes."""
    vector = [0.0] * EMBEDDING_DIMENSIONS
    for index, weight in weights:
        vector[index] = weight
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector]


def unit(index: int) -> list[float]:
    return axis((index, 1.0))


def random_sha() -> str:
    return secrets.token_hex(32)


def chunk(
    ordinal: int,
    text: str,
    embedding: Sequence[float],
    *,
    page: int | None = 1,
    heading: str | None = None,
) -> ChunkRecord:
    return ChunkRecord(ordinal, text, page, heading, embedding)


def stats_for(chunks: Sequence[ChunkRecord], pages: int | None = 1) -> DocumentStats:
    return DocumentStats(len(chunks), sum(len(c.text) for c in chunks), pages)


def keys(found: Sequence[RetrievedChunk]) -> list[tuple[str, int]]:
    return [(c.document_sha256, c.ordinal) for c in found]


@pytest.fixture
async def pool(servers: Servers) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(servers.database_url, min_size=1, max_size=8)
    yield pool
    await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> ChunkStore:
    return ChunkStore(pool)


async def stored_rows(pool: asyncpg.Pool, tenant: str, sha: str) -> list[tuple[int, str]]:
    rows = await pool.fetch(
        "SELECT ordinal, text FROM document_chunks "
        "WHERE tenant = $1 AND document_sha256 = $2 ORDER BY ordinal",
        tenant,
        sha,
    )
    return [(row["ordinal"], row["text"]) for row in rows]


# --- storing -------------------------------------------------------------------------------------


async def test_storing_twice_stores_once_and_keeps_the_first_version(
    store: ChunkStore, pool: asyncpg.Pool
) -> None:
    tenant, sha = random_tenant(), random_sha()
    first = [chunk(0, "first version", unit(0)), chunk(1, "second chunk", unit(1))]
    assert await store.ingested(tenant, sha) is None

    assert await store.store(tenant, sha, first, DocumentStats(2, 25, 3)) is True
    again = [chunk(0, "a different text", unit(2))]
    assert await store.store(tenant, sha, again, DocumentStats(1, 16, None)) is False

    assert await store.ingested(tenant, sha) == DocumentStats(chunks=2, characters=25, pages=3)
    assert await stored_rows(pool, tenant, sha) == [(0, "first version"), (1, "second chunk")]


async def test_a_document_without_pages_records_none(store: ChunkStore) -> None:
    tenant, sha = random_tenant(), random_sha()
    chunks = [chunk(0, "a docx paragraph", unit(0), page=None)]
    assert await store.store(tenant, sha, chunks, stats_for(chunks, pages=None))
    assert await store.ingested(tenant, sha) == DocumentStats(1, len("a docx paragraph"), None)


async def test_the_same_document_is_ingested_separately_per_tenant(store: ChunkStore) -> None:
    sha = random_sha()
    chunks = [chunk(0, "shared upload", unit(0))]
    first, second = random_tenant(), random_tenant()
    assert await store.store(first, sha, chunks, stats_for(chunks))
    assert await store.ingested(second, sha) is None
    assert await store.store(second, sha, chunks, stats_for(chunks))


async def test_a_failed_store_leaves_nothing_behind(store: ChunkStore, pool: asyncpg.Pool) -> None:
    tenant, sha = random_tenant(), random_sha()
    chunks = [chunk(0, "alpha", unit(0)), chunk(1, "beta", unit(1))]
    # The chunks insert succeeds, then the ingested_documents row violates its CHECK: the whole
    # transaction must roll back, chunks included.
    with pytest.raises(asyncpg.CheckViolationError):
        await store.store(tenant, sha, chunks, DocumentStats(2, -1, None))
    assert await store.ingested(tenant, sha) is None
    assert await stored_rows(pool, tenant, sha) == []

    assert await store.store(tenant, sha, chunks, stats_for(chunks)) is True
    assert await stored_rows(pool, tenant, sha) == [(0, "alpha"), (1, "beta")]


async def test_concurrent_stores_of_one_document_write_it_once(
    store: ChunkStore, pool: asyncpg.Pool
) -> None:
    tenant, sha = random_tenant(), random_sha()
    chunks = [chunk(i, f"chunk number {i}", unit(i)) for i in range(50)]
    results = await asyncio.gather(
        *(store.store(tenant, sha, chunks, stats_for(chunks)) for _ in range(6))
    )
    assert sorted(results) == [False] * 5 + [True]
    assert len(await stored_rows(pool, tenant, sha)) == 50
    assert await store.ingested(tenant, sha) == stats_for(chunks)


async def test_inconsistent_input_is_refused_before_anything_is_written(
    store: ChunkStore,
) -> None:
    tenant, sha = random_tenant(), random_sha()
    with pytest.raises(ValueError, match="stats say 2 chunks"):
        await store.store(tenant, sha, [chunk(0, "a", unit(0))], DocumentStats(2, 1, 1))
    duplicated = [chunk(0, "a", unit(0)), chunk(0, "b", unit(1))]
    with pytest.raises(ValueError, match="ordinals must be unique"):
        await store.store(tenant, sha, duplicated, stats_for(duplicated))
    with pytest.raises(ValueError, match="384 dimensions"):
        await store.store(tenant, sha, [chunk(0, "a", [1.0, 0.0])], DocumentStats(1, 1, 1))
    with pytest.raises(ValueError, match="NaN or infinity"):
        await store.store(tenant, sha, [chunk(0, "a", [math.nan] * 384)], DocumentStats(1, 1, 1))
    assert await store.ingested(tenant, sha) is None


def test_vectors_travel_in_pgvector_text_form() -> None:
    literal = vector_literal([0.5, -0.25, *([0.0] * (EMBEDDING_DIMENSIONS - 2))])
    assert literal.startswith("[0.5,-0.25,0,")
    assert literal.endswith(",0]")


async def test_stored_embeddings_round_trip(store: ChunkStore, pool: asyncpg.Pool) -> None:
    tenant, sha = random_tenant(), random_sha()
    embedding = axis((0, 0.6), (5, 0.8))
    assert await store.store(tenant, sha, [chunk(0, "x", embedding)], DocumentStats(1, 1, 1))
    text = await pool.fetchval(
        "SELECT embedding::text FROM document_chunks WHERE tenant = $1 AND document_sha256 = $2",
        tenant,
        sha,
    )
    values = [float(v) for v in text.strip("[]").split(",")]
    assert values == pytest.approx(embedding, abs=1e-7)


# --- searching -----------------------------------------------------------------------------------


async def test_keyword_and_vector_matches_are_both_found_and_agreement_ranks_first(
    store: ChunkStore,
) -> None:
    tenant, sha = random_tenant(), random_sha()
    chunks = [
        chunk(0, "The lease runs for three years from signing.", unit(0), page=1),
        chunk(1, "A zebra was seen near the river.", unit(1), page=2),
        # Near the query vector and matching both query words, side by side.
        chunk(2, "The zebra xylophone concert.", axis((0, 0.9), (2, 0.1)), page=3),
        *(chunk(i, f"filler paragraph {i}", unit(i), page=4) for i in range(3, 10)),
    ]
    assert await store.store(tenant, sha, chunks, stats_for(chunks, pages=4))

    found = await store.search(tenant, "zebra xylophone", unit(0), top_k=3)

    # 2 is second by vector and first by text; 1 matches by text only; 0 by vector only.
    assert keys(found) == [(sha, 2), (sha, 1), (sha, 0)]
    assert [c.score for c in found] == sorted((c.score for c in found), reverse=True)
    assert found[0].score == pytest.approx(1 / 61 + 1 / 62)


async def test_a_vector_only_match_is_found_when_no_word_matches(store: ChunkStore) -> None:
    tenant, sha = random_tenant(), random_sha()
    chunks = [chunk(i, f"paragraph {i} about nothing", unit(i)) for i in range(10)]
    assert await store.store(tenant, sha, chunks, stats_for(chunks))

    found = await store.search(tenant, "quantum chromodynamics", unit(7), top_k=2)
    assert keys(found)[0] == (sha, 7)
    # An empty or punctuation-only query is a vector-only search, not an error.
    assert keys(await store.search(tenant, "", unit(4), top_k=1)) == [(sha, 4)]
    assert keys(await store.search(tenant, "?!", unit(5), top_k=1)) == [(sha, 5)]


async def test_a_keyword_only_match_is_found_when_the_vector_prefers_nothing(
    store: ChunkStore,
) -> None:
    tenant, sha = random_tenant(), random_sha()
    chunks = [chunk(i, f"ordinary paragraph {i}", unit(i)) for i in range(10)]
    chunks[8] = chunk(8, "The indemnification clause survives termination.", unit(8))
    assert await store.store(tenant, sha, chunks, stats_for(chunks))

    found = await store.search(tenant, "What does indemnification cover?", unit(NOWHERE), top_k=1)
    assert keys(found) == [(sha, 8)]


async def test_search_never_returns_another_tenants_chunks(store: ChunkStore) -> None:
    # The same document (same sha256) uploaded by two tenants; the other tenant's copy matches
    # the query exactly, in words and in vector.
    sha = random_sha()
    mine, theirs = random_tenant(), random_tenant()
    their_chunks = [chunk(0, "secret merger terms", unit(0)), chunk(1, "secret", unit(1))]
    my_chunks = [chunk(0, "public annual report", unit(3)), chunk(1, "public notes", unit(4))]
    assert await store.store(theirs, sha, their_chunks, stats_for(their_chunks))
    other = random_sha()
    assert await store.store(theirs, other, their_chunks, stats_for(their_chunks))
    assert await store.store(mine, sha, my_chunks, stats_for(my_chunks))

    found = await store.search(mine, "secret merger terms", unit(0), top_k=10)
    assert {c.text for c in found} == {"public annual report", "public notes"}
    found = await store.search(mine, "secret merger terms", unit(0), document_sha256s=[other])
    assert found == []
    assert await store.search(random_tenant(), "secret", unit(0)) == []


async def test_the_document_filter_limits_results_to_the_given_documents(
    store: ChunkStore,
) -> None:
    tenant = random_tenant()
    first, second, third = random_sha(), random_sha(), random_sha()
    for index, sha in enumerate((first, second, third)):
        chunks = [chunk(i, f"budget table {index}-{i}", unit(10 * index + i)) for i in range(5)]
        assert await store.store(tenant, sha, chunks, stats_for(chunks))

    found = await store.search(tenant, "budget", unit(0), top_k=20, document_sha256s=[second])
    assert {c.document_sha256 for c in found} == {second}
    assert len(found) == 5
    found = await store.search(tenant, "budget", unit(0), top_k=20, document_sha256s=[first, third])
    assert {c.document_sha256 for c in found} == {first, third}
    assert await store.search(tenant, "budget", unit(0), document_sha256s=[]) == []
    everything = await store.search(tenant, "budget", unit(0), top_k=20)
    assert {c.document_sha256 for c in everything} == {first, second, third}


async def test_russian_and_arabic_keywords_find_their_chunks_with_page_and_heading(
    store: ChunkStore,
) -> None:
    tenant, sha = random_tenant(), random_sha()
    chunks = [
        chunk(0, "General terms of the agreement.", unit(0), page=1, heading="1. Terms"),
        chunk(
            1,
            "Договор аренды заключён на три года и продлевается автоматически.",
            unit(1),
            page=4,
            heading=SECTION_HEADING,
        ),
        chunk(2, "يسري هذا العقد لمدة ثلاث سنوات.", unit(2), page=7, heading="المدة"),
        *(chunk(i, f"appendix {i}", unit(i), page=9) for i in range(3, 8)),
    ]
    assert await store.store(tenant, sha, chunks, stats_for(chunks, pages=9))

    (russian,) = await store.search(tenant, "Сколько длится АРЕНДЫ?", unit(NOWHERE), top_k=1)
    assert (russian.ordinal, russian.page, russian.heading) == (1, 4, SECTION_HEADING)
    assert russian.text.startswith("Договор аренды")

    (arabic,) = await store.search(tenant, "العقد", unit(NOWHERE), top_k=1)
    assert (arabic.ordinal, arabic.page, arabic.heading) == (2, 7, "المدة")

    # Headings are searchable too: "действия" appears only in chunk 1's heading.
    (by_heading,) = await store.search(tenant, "действия", unit(NOWHERE), top_k=1)
    assert by_heading.ordinal == 1


async def test_ties_are_broken_by_document_then_ordinal(store: ChunkStore) -> None:
    tenant = random_tenant()
    shas = sorted(random_sha() for _ in range(2))
    for sha in reversed(shas):
        chunks = [chunk(i, "identical words", unit(NOWHERE - 1)) for i in range(3)]
        assert await store.store(tenant, sha, chunks, stats_for(chunks))

    found = await store.search(tenant, "identical words", unit(NOWHERE - 1), top_k=6)
    assert keys(found) == [(sha, i) for sha in shas for i in range(3)]
    assert keys(await store.search(tenant, "identical words", unit(NOWHERE - 1), top_k=6)) == keys(
        found
    )


async def test_top_k_and_candidates_bound_the_result(store: ChunkStore) -> None:
    tenant, sha = random_tenant(), random_sha()
    chunks = [chunk(i, f"common word {i}", unit(i)) for i in range(30)]
    assert await store.store(tenant, sha, chunks, stats_for(chunks))

    assert len(await store.search(tenant, "common", unit(0), top_k=7)) == 7
    # candidates below top_k are raised to top_k: asking for 10 gives 10.
    assert len(await store.search(tenant, "common", unit(0), top_k=10, candidates=3)) == 10
    assert await store.search(tenant, "common", unit(0), top_k=0) == []


async def test_a_filtered_hnsw_scan_is_not_cut_short_by_other_tenants(servers: Servers) -> None:
    """With the planner pushed onto the HNSW index, a tenant whose chunks are all farther from
    the query than many other tenants' chunks still gets its results (pgvector's iterative
    scan), instead of an empty vector ranking after the tenant filter.

    The vectors are random rather than axis-aligned: HNSW needs spread-out data to build a
    connected graph, and real embeddings are spread out too.
    """
    rng = random.Random(20240601)

    def noisy(bias: float) -> list[float]:
        values = [rng.gauss(0.0, 1.0) for _ in range(EMBEDDING_DIMENSIONS)]
        values[0] += bias
        norm = math.sqrt(sum(v * v for v in values))
        return [v / norm for v in values]

    crowded = [chunk(i, "x", noisy(8.0)) for i in range(300)]  # near the query, axis 0
    far = [chunk(i, "far away", noisy(0.0)) for i in range(3)]
    # Every crowded chunk is nearer the query than any of ours (cosine similarity = first value).
    assert min(c.embedding[0] for c in crowded) > max(c.embedding[0] for c in far)

    settings = {"enable_seqscan": "off", "enable_bitmapscan": "off", "enable_sort": "off"}
    pool = await asyncpg.create_pool(
        servers.database_url, min_size=1, max_size=2, server_settings=settings
    )
    try:
        store = ChunkStore(pool)
        crowd, mine, sha = random_tenant(), random_tenant(), random_sha()
        assert await store.store(crowd, random_sha(), crowded, stats_for(crowded))
        assert await store.store(mine, sha, far, stats_for(far))

        async with pool.acquire() as conn:
            plan = await conn.fetch(
                "EXPLAIN SELECT ordinal FROM document_chunks WHERE tenant = $1 "
                "ORDER BY embedding <=> $2::vector LIMIT 40",
                mine,
                vector_literal(unit(0)),
            )
        assert "document_chunks_embedding_hnsw_idx" in "\n".join(row[0] for row in plan)

        found = await store.search(mine, "", unit(0), top_k=3)
        by_distance = sorted(range(3), key=lambda i: -far[i].embedding[0])
        assert keys(found) == [(sha, i) for i in by_distance]
    finally:
        await pool.close()
