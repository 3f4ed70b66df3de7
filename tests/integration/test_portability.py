"""The bundled native servers run on the oldest CPU ticketflow supports: x86-64-v3 (Haswell).

Each binary on the main job's path runs under `qemu-x86_64 -cpu Haswell`, which executes it on an
emulated Haswell: an instruction Haswell lacks (AVX-512, say) ends it with SIGILL, whatever CPU
runs the tests. The negative control runs the same PostgreSQL work on a Nehalem (no AVX) and
expects that crash, which shows the emulated CPU model is what the tests exercise.

Python's own native extensions are not emulated here: llama.cpp is compiled by `scripts/install`
for x86-64-v3 and its disassembly is checked instead (an emulated model run takes minutes), and
the rest come as manylinux wheels for baseline x86-64 with runtime dispatch. `scripts/install
--dev` installs qemu-user; these tests fail, never skip, without it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ticketflow.embedded import bundled_binary, redis_server_args
from ticketflow.postgres import PostgresServer, binary, run_as
from ticketflow.processes import free_port, spawn, stop_process, wait_for_port

SUPPORTED_CPU = "Haswell"
TOO_OLD_CPU = "Nehalem"
ROWS = 100

# The work of the main job: both extensions, a vector(384) table with an HNSW index filled by
# inserts (where a pgvector built for a newer CPU dies), a nearest-neighbour query and a
# trigram search. One statement per line: single-user mode runs each line as it reads it.
SQL = f"""
CREATE EXTENSION vector;
CREATE EXTENSION pg_trgm;
CREATE TABLE chunks (id int PRIMARY KEY, body text, embedding vector(384));
CREATE INDEX ON chunks USING hnsw (embedding vector_cosine_ops);
CREATE INDEX ON chunks USING gin (body gin_trgm_ops);
INSERT INTO chunks SELECT i, 'chunk number ' || i, (SELECT array_agg(sin(i * 0.37 + j * 0.11))::vector(384) FROM generate_series(1, 384) AS j) FROM generate_series(1, {ROWS}) AS i;
SET enable_seqscan = off;
SELECT id AS nearest FROM chunks ORDER BY embedding <=> (SELECT embedding FROM chunks WHERE id = 7) LIMIT 1;
SELECT id AS trigram FROM chunks WHERE body % 'chunk numbr 42' ORDER BY similarity(body, 'chunk numbr 42') DESC LIMIT 1;
"""  # noqa: E501


@pytest.fixture(scope="module")
def qemu() -> str:
    found = shutil.which("qemu-x86_64")
    if found is None:
        pytest.fail("qemu-x86_64 is missing: `./scripts/install --dev` installs qemu-user")
    return found


def emulated(qemu: str, cpu: str, args: list[str]) -> list[str]:
    return [qemu, "-cpu", cpu, *args]


@pytest.fixture(scope="module")
def template_pgdata(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh data directory, made natively by the bundled initdb: what runs under emulation
    is the server's own work on it."""
    root = tmp_path_factory.mktemp("portability")
    server = PostgresServer(root / "template", root / "template.log")
    server.prepare()
    return server.pgdata


def single_user(qemu: str, cpu: str, template: Path, tmp_path: Path) -> tuple[int, str]:
    pgdata = tmp_path / f"pgdata-{cpu}"
    subprocess.run(["cp", "-a", str(template), str(pgdata)], check=True)
    user = run_as()
    # Started in its data directory, as the embedded server is (see PostgresServer._path_arg).
    data = "/proc/self/cwd" if user else str(pgdata)
    result = subprocess.run(
        emulated(qemu, cpu, [str(binary("postgres")), "--single", "-D", data, "postgres"]),
        input=SQL,
        cwd=pgdata,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        user=user.uid if user else None,
        group=user.gid if user else None,
        extra_groups=[] if user else None,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_postgres_with_pgvector_and_pg_trgm_runs_on_a_haswell(
    qemu: str, template_pgdata: Path, tmp_path: Path
) -> None:
    code, output = single_user(qemu, SUPPORTED_CPU, template_pgdata, tmp_path)
    assert code == 0, output[-3000:]
    assert 'nearest = "7"' in output, output[-3000:]
    assert 'trigram = "42"' in output, output[-3000:]
    assert "ERROR" not in output, output[-3000:]


@pytest.mark.timeout(120)
def test_the_same_work_dies_on_a_cpu_without_avx(
    qemu: str, template_pgdata: Path, tmp_path: Path
) -> None:
    """The negative control: the check fails where the binaries cannot run."""
    code, output = single_user(qemu, TOO_OLD_CPU, template_pgdata, tmp_path)
    assert code != 0
    assert "signal 4" in output or "Illegal instruction" in output, output[-3000:]
    assert 'nearest = "7"' not in output


def wait_answering(check: object, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"exited with {process.returncode}"
        try:
            check()  # type: ignore[operator]
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture
def emulated_server(qemu: str, tmp_path: Path) -> Iterator[object]:
    started: list[subprocess.Popen[bytes]] = []

    def run(args: list[str], log: str) -> subprocess.Popen[bytes]:
        process = spawn(emulated(qemu, SUPPORTED_CPU, args), tmp_path / log)
        started.append(process)
        return process

    yield run
    for process in started:
        stop_process(process)


@pytest.mark.timeout(180)
def test_redis_server_runs_on_a_haswell(qemu: str, emulated_server: object, tmp_path: Path) -> None:
    args = redis_server_args(tmp_path, free_port())
    version = subprocess.run(
        emulated(qemu, SUPPORTED_CPU, [args[0], "--version"]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert version.returncode == 0, version.stderr
    assert "Redis server v=" in version.stdout
    port = int(args[args.index("--port") + 1])
    process = emulated_server(args, "redis.log")  # type: ignore[operator]
    wait_for_port(port, process, tmp_path / "redis.log", timeout=60)
    client = redis.Redis(port=port, socket_timeout=30)
    try:
        wait_answering(client.ping, process, 60)
        client.rpush("queue", *[str(i) for i in range(1000)])
        assert client.llen("queue") == 1000
        assert client.incrby("counter", 41) == 41
        assert client.set("key", "value", ex=60)
        assert client.get("key") == b"value"
    finally:
        client.close()


@pytest.mark.timeout(180)
def test_nats_server_with_jetstream_runs_on_a_haswell(
    qemu: str, emulated_server: object, tmp_path: Path
) -> None:
    import nats

    server = bundled_binary("nats-server")
    version = subprocess.run(
        emulated(qemu, SUPPORTED_CPU, [server, "--version"]),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert version.returncode == 0, version.stderr
    assert "nats-server" in version.stdout + version.stderr
    port = free_port()
    args = [server, "-js", "--store_dir", str(tmp_path / "js"), "-a", "127.0.0.1", "-p", str(port)]
    process = emulated_server(args, "nats.log")  # type: ignore[operator]
    wait_for_port(port, process, tmp_path / "nats.log", timeout=60)

    async def publish() -> int:
        nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=30)
        try:
            js = nc.jetstream(timeout=30)
            await js.add_stream(name="PORTABILITY", subjects=["portability.>"])
            for i in range(20):
                await js.publish(f"portability.{i}", b"x" * 1024)
            info = await js.stream_info("PORTABILITY")
            return int(info.state.messages)
        finally:
            await nc.close()

    assert asyncio.run(publish()) == 20


# Registers and instructions that x86-64-v3 lacks: AVX-512 (zmm registers, opmask registers) and
# AMX (tile registers). A native llama.cpp build on a CPU that advertises them uses them.
_BEYOND_V3 = ("%zmm", "%tmm", "tilezero", "tileloadd", "{%k")


@pytest.mark.timeout(180)
def test_llama_cpp_is_built_for_x86_64_v3() -> None:
    """llama.cpp's CPU kernels hold no AVX-512 or AMX instruction and do use AVX2.

    `scripts/install` compiles llama.cpp here with `GGML_NATIVE=OFF` and the x86-64-v3 flags. The
    disassembly is the check rather than an emulated run (loading the model under qemu takes
    minutes): a `-march=native` build on an AMX or AVX-512 machine fails it.
    """
    import llama_cpp

    objdump = shutil.which("objdump")
    assert objdump is not None, "objdump (binutils) is needed to inspect llama.cpp's build"
    libraries = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu*.so"))
    assert libraries, "llama_cpp ships no libggml-cpu library"
    for library in libraries:
        listing = subprocess.run(
            [objdump, "-d", "--no-show-raw-insn", str(library)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found = {marker for marker in _BEYOND_V3 if marker in listing}
        assert not found, f"{library.name} uses {sorted(found)}: rebuild with ./scripts/install"
        assert "%ymm" in listing, f"{library.name} has no AVX2 code: built without the v3 flags"


# The API servers' event loop (uvloop, libuv) and HTTP parser (httptools): one request parsed and
# answered over a real socket by a uvloop server, in an emulated interpreter.
_EVENT_LOOP_CHECK = """
import asyncio, httptools, uvloop

class Handler:
    def __init__(self):
        self.url = b""
    def on_url(self, url):
        self.url += url

async def main():
    async def serve(reader, writer):
        handler = Handler()
        parser = httptools.HttpRequestParser(handler)
        parser.feed_data(await reader.readuntil(b"\\r\\n\\r\\n"))
        body = handler.url
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /tickets/42 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    answer = await reader.read()
    server.close()
    print(type(asyncio.get_running_loop()).__module__, answer.split(b"\\r\\n\\r\\n")[1].decode())

uvloop.run(main())
"""


@pytest.mark.timeout(120)
def test_the_api_event_loop_and_http_parser_run_on_a_haswell(qemu: str) -> None:
    done = subprocess.run(
        emulated(qemu, SUPPORTED_CPU, [sys.executable, "-c", _EVENT_LOOP_CHECK]),
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["uvloop", "/tickets/42"]
