"""A throwaway PostgreSQL server on loopback for tests that share one Optuna RDB storage between processes.

`postgres_server()` runs `initdb` into a fresh temporary directory, starts the server with `pg_ctl` on
127.0.0.1 only (a free port; its unix socket inside the same directory), trusts loopback connections,
creates one database and yields its SQLAlchemy URL. On exit the server is stopped and the directory removed.

The server binaries come from the Debian `postgresql` package (/usr/lib/postgresql/VERSION/bin; `make
postgres` installs it), with PATH as a fallback. PostgreSQL refuses to run as root: as root the server
runs as the `postgres` system user that package creates.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # one directory per installed major version
SERVER_USER_WHEN_ROOT = "postgres"  # system user created by Debian's postgresql-common
SUPERUSER = "autoq"  # database superuser made by initdb; the URL logs in as this role
START_TIMEOUT_SECONDS = 60
SERVER_SETTINGS = {  # small and fast: a test server holds a few studies, losing it on a crash is fine
    "shared_buffers": "32MB",
    "max_connections": "50",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
INSTALL_HINT = "run `make postgres` (as root it installs the Debian `postgresql` package)"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed, or cannot be run as the current user."""


def find_bin_dir() -> Path:
    """The directory holding `initdb` and `pg_ctl`: the newest Debian install, else wherever PATH has them."""

    def major_version(bin_dir: str) -> float:
        version = Path(bin_dir).parent.name
        return float(version) if version.replace(".", "", 1).isdigit() else -1.0

    for bin_dir in sorted(glob.glob(DEBIAN_BIN_GLOB), key=major_version, reverse=True):
        if all(os.access(os.path.join(bin_dir, tool), os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(bin_dir)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl", path=os.path.dirname(initdb)):
        return Path(initdb).parent
    raise PostgresUnavailable(f"no `initdb` and `pg_ctl` in {DEBIAN_BIN_GLOB} or on PATH: {INSTALL_HINT}")


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgres_server(database: str = "autoq") -> Iterator[str]:
    """Start a throwaway server on 127.0.0.1; yield `postgresql+psycopg://autoq@127.0.0.1:PORT/DATABASE`.

    Raises PostgresUnavailable if the binaries are missing (or, as root, there is no `postgres` user),
    RuntimeError with the server's log tail if it does not start within START_TIMEOUT_SECONDS.
    """
    bin_dir = find_bin_dir()
    server_dir = Path(tempfile.mkdtemp(prefix="autoq-pg-"))
    data_dir, log_file, port = server_dir / "data", server_dir / "server.log", free_loopback_port()
    try:
        run_as = _server_user_prefix(server_dir)

        def run(*command: str) -> None:
            result = subprocess.run([*run_as, *command], cwd=server_dir, stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n"
                                   f"{result.stdout}{result.stderr}{_log_tail(log_file)}")

        run(str(bin_dir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER, "--auth=trust", "--no-sync",
            "--encoding=UTF8", "--locale=C")
        settings = {**SERVER_SETTINGS, "listen_addresses": "'127.0.0.1'", "port": str(port),
                    "unix_socket_directories": f"'{server_dir}'"}
        with open(data_dir / "postgresql.conf", "a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        try:
            run(str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log_file), "-w",
                "-t", str(START_TIMEOUT_SECONDS), "start")
            _create_database(port, database)
            yield f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/{database}"
        finally:
            if (data_dir / "postmaster.pid").exists():  # also after a start that timed out
                run(str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(server_dir, ignore_errors=True)


def _server_user_prefix(server_dir: Path) -> list[str]:
    """The command prefix that runs the server binaries: none, or as root `runuser -u postgres --`.

    As root, `server_dir` is handed to the `postgres` user.
    """
    if os.geteuid() != 0:
        return []
    try:
        server_user = pwd.getpwnam(SERVER_USER_WHEN_ROOT)
    except KeyError:
        raise PostgresUnavailable(
            f"PostgreSQL refuses to run as root and there is no {SERVER_USER_WHEN_ROOT!r} system user "
            f"to run it as: {INSTALL_HINT}"
        ) from None
    os.chown(server_dir, server_user.pw_uid, server_user.pw_gid)
    prefix = ["runuser", "-u", SERVER_USER_WHEN_ROOT, "--"]
    if subprocess.run([*prefix, "test", "-w", str(server_dir)], stdin=subprocess.DEVNULL).returncode != 0:
        raise PostgresUnavailable(
            f"the {SERVER_USER_WHEN_ROOT!r} user cannot write to the temporary directory {server_dir} "
            f"(a parent is closed to it): point TMPDIR at a directory every user can enter, such as /tmp"
        )
    return prefix


def _create_database(port: int, database: str) -> None:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user=SUPERUSER, dbname="postgres",
                         autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{database}"')


def _log_tail(log_file: Path, lines: int = 20) -> str:
    if not log_file.exists():
        return ""
    tail = log_file.read_text(errors="replace").splitlines()[-lines:]
    return f"--- last lines of {log_file} ---\n" + "\n".join(tail)
