"""A throwaway PostgreSQL cluster for tests: started once per session, gone afterwards.

The cluster lives in a fresh directory under the system temp dir: its data in ``data/``,
its only socket beside it. It listens on that Unix socket alone (``listen_addresses=''``:
the project allows no network traffic beyond loopback and the lab), trusts every local
connection, and runs without fsync (nothing in it has to survive a crash).

PostgreSQL refuses to run as root, so as root the server binaries run as the ``postgres``
system user the Debian package creates (or ``nobody``), through ``runuser``; an
unprivileged caller runs them as itself. :func:`unavailable` says why a cluster cannot be
started here, for a skip message.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

DATABASE = "hostmaint"
SUPERUSER = "postgres"
# Debian keeps the server binaries out of PATH; the newest major version wins
BINDIR_GLOB = "/usr/lib/postgresql/*/bin"
RUN_AS_CANDIDATES = ("postgres", "nobody")
START_TIMEOUT_S = 60

# a throwaway cluster: speed over durability, and nothing but the socket
SETTINGS = {
    "listen_addresses": "''",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "lock_timeout": "'30s'",  # a test that leaves a lock behind fails the next one instead of hanging it
}


def bindir() -> Path | None:
    """Where ``initdb``, ``pg_ctl`` and ``postgres`` are: PATH first, then Debian's versioned dirs."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versioned = sorted(Path("/").glob(BINDIR_GLOB.lstrip("/")),
                       key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    for candidate in reversed(versioned):
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


def run_as_user() -> str | None:
    """The unprivileged user to run the server as: ourselves unless we are root."""
    if os.geteuid() != 0:
        return getpass.getuser()
    for name in RUN_AS_CANDIDATES:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return None


def unavailable() -> str | None:
    """Why a test cluster cannot run here (a skip reason), or None if it can."""
    if bindir() is None:
        return ("PostgreSQL server binaries not found (no initdb on PATH or in /usr/lib/postgresql/*/bin):"
                " apt-get install postgresql (scripts/install-system.sh does, as root)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL refuses to run as root"
    if run_as_user() is None:
        return f"running as root with none of the users {', '.join(RUN_AS_CANDIDATES)} to run PostgreSQL as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed: pip install -e '.[postgres]' (scripts/setup.sh does)"
    return None


@dataclass
class Cluster:
    """A running throwaway cluster. ``url`` is its database ``hostmaint`` as an SQLAlchemy URL."""

    bindir: Path
    base: Path  # data/, the socket and server.log
    user: str

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def url(self) -> str:
        return self.url_as(SUPERUSER)

    def url_as(self, user: str) -> str:
        """The ``hostmaint`` database as another role (trust auth: no password)."""
        return f"postgresql+psycopg://{user}@/{DATABASE}?host={self.base}"

    def reset(self) -> None:
        """Empty the ``hostmaint`` database: drop its schema with every table in it, and make it anew."""
        import psycopg

        with psycopg.connect(host=str(self.base), user=SUPERUSER, dbname=DATABASE, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")

    def stop(self) -> None:
        """Stop the server (no checkpoint: the data is thrown away) and remove its directory."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                cwd=self.base, timeout=START_TIMEOUT_S + 30)
        if result.returncode != 0:
            log = self.base / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}{tail}")


def start() -> Cluster:
    """initdb a fresh cluster in a new temp dir, start it on its Unix socket and create ``hostmaint``."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    bin_path, user = bindir(), run_as_user()
    assert bin_path is not None and user is not None
    # not pytest's tmp_path: that sits under a root-only (0700) dir the server user cannot enter
    base = Path(tempfile.mkdtemp(prefix="hostmaint-pg-"))
    cluster = Cluster(bindir=bin_path, base=base, user=user)
    try:
        if os.geteuid() == 0:
            shutil.chown(base, user=user)
        cluster._run("initdb", "-D", str(cluster.data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                     "--no-locale", "--no-sync")
        with (cluster.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# hostmaint tests: a throwaway cluster on a Unix socket only\n")
            conf.write(f"unix_socket_directories = '{base}'\n")
            conf.writelines(f"{key} = {value}\n" for key, value in SETTINGS.items())
        cluster._run("pg_ctl", "-D", str(cluster.data), "-l", str(base / "server.log"), "-w",
                     "-t", str(START_TIMEOUT_S), "start")
        import psycopg

        with psycopg.connect(host=str(base), user=SUPERUSER, dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
    except BaseException:
        cluster.stop()
        raise
    return cluster
