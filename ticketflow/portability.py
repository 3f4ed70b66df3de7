"""What the bundled native binaries need from the CPU, and a check that they run on this one.

The embedded PostgreSQL and pgvector are built for x86-64-v3 (Haswell and newer, Zen and newer).
A binary built for more (AVX-512, say) dies with SIGILL on the first instruction this CPU lacks:
for pgvector that happens deep inside an HNSW insert, which PostgreSQL reports as a lost
connection and a restart into recovery. `vector_self_check` runs exactly that path once at
start-up, so a CPU that cannot run the binaries is named at once instead of failing requests.
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psycopg

# x86-64-v3 as /proc/cpuinfo spells its features (LZCNT is `abm`); v2's and v1's come with it.
X86_64_V2_FLAGS = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")
X86_64_V3_FLAGS = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
REQUIRED_CPU_FLAGS = X86_64_V2_FLAGS + X86_64_V3_FLAGS
REQUIRED_LEVEL = "x86-64-v3"

VECTOR_DIMENSION = 384
VECTOR_ROWS = 64


class VectorCheckFailed(RuntimeError):
    """A real vector query did not run on the embedded PostgreSQL; the message says why."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags of this machine's first CPU (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    found = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(found.group(1).split()) if found else set()


def missing_cpu_flags(flags: Iterable[str]) -> list[str]:
    present = set(flags)
    return [flag for flag in REQUIRED_CPU_FLAGS if flag not in present]


def describe_cpu(flags: Iterable[str] | None = None) -> str:
    """One line for a message: what the binaries need and what this CPU lacks of it."""
    flags = cpu_flags() if flags is None else set(flags)
    needed = f"the bundled binaries need an {REQUIRED_LEVEL} CPU ({' '.join(X86_64_V3_FLAGS)})"
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return f"{needed}; this machine is {machine}"
    if not flags:
        return f"{needed}; this CPU's flags could not be read"
    missing = missing_cpu_flags(flags)
    if missing:
        return (
            f"{needed}; this CPU lacks {' '.join(missing)} (its flags: {' '.join(sorted(flags))})"
        )
    return f"{needed}; this CPU has all of them"


def _probe_vector(index: int) -> str:
    # Distinct, deterministic, non-trivial vectors: a point on a curve per row.
    values = ",".join(
        f"{((index * 31 + j * 17) % 97) / 97 - 0.5:.4f}" for j in range(VECTOR_DIMENSION)
    )
    return f"[{values}]"


def _crashed_on_illegal_instruction(server_log: Callable[[], str] | None) -> bool:
    """Whether the server's log says a backend died of SIGILL (the postmaster writes it a
    moment after the client saw its connection go)."""
    if server_log is None:
        return False
    for _ in range(20):
        log = server_log()
        if "signal 4" in log or "Illegal instruction" in log:
            return True
        time.sleep(0.1)
    return False


def vector_self_check(database_url: str, *, server_log: Callable[[], str] | None = None) -> None:
    """Build an HNSW index over `vector(384)` rows and run a nearest-neighbour query, in a
    transaction that is rolled back. Raise `VectorCheckFailed` naming the CPU when the server
    dies doing it (an illegal instruction in pgvector), or another reason when it fails.

    `server_log` returns the end of the server's log, where a crash's signal is named."""
    try:
        with (
            psycopg.connect(database_url, connect_timeout=10) as conn,
            conn.transaction(force_rollback=True),
        ):
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            conn.execute(
                f"CREATE TEMP TABLE tf_vector_check "
                f"(id int PRIMARY KEY, embedding vector({VECTOR_DIMENSION}))"
            )
            conn.execute("CREATE INDEX ON tf_vector_check USING hnsw (embedding vector_cosine_ops)")
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO tf_vector_check VALUES (%s, %s::vector)",
                    [(i, _probe_vector(i)) for i in range(VECTOR_ROWS)],
                )
            conn.execute("SET LOCAL enable_seqscan = off")
            nearest = conn.execute(
                "SELECT id FROM tf_vector_check ORDER BY embedding <=> %s::vector LIMIT 1",
                (_probe_vector(7),),
            ).fetchone()
    except psycopg.OperationalError as error:
        crashed = _crashed_on_illegal_instruction(server_log)
        reason = (
            "PostgreSQL's pgvector died with an illegal instruction (SIGILL)"
            if crashed
            else f"the PostgreSQL server process died or hung up ({str(error).strip()})"
        )
        raise VectorCheckFailed(
            f"a vector query (HNSW index over vector({VECTOR_DIMENSION})) does not run on the "
            f"embedded PostgreSQL: {reason}. {describe_cpu()}."
        ) from error
    except psycopg.Error as error:
        raise VectorCheckFailed(
            f"a vector query does not run on the embedded PostgreSQL: {str(error).strip()}"
        ) from error
    if nearest is None or nearest[0] != 7:
        raise VectorCheckFailed(
            f"the HNSW nearest-neighbour query answered {nearest!r}, expected row 7"
        )
