"""``python -m prunegrid.head start`` / ``bash scripts/head.sh start``: the shared state of a cluster.

One machine (the head) runs what every worker of a Ray grid or a distributed sweep writes to:

- **PostgreSQL** (Debian's ``postgresql``), a cluster of its own under ``--dir``, with a role
  ``prunegrid`` (a random password, kept in ``<dir>/head.json``, mode 0600) and two databases:
  ``mlflow`` (the tracking server's backend store) and ``optuna`` (the sweeps' studies). Host
  connections need the password (scram-sha-256).
- **An MLflow tracking server** on that PostgreSQL, with proxied artifact storage
  (``--artifacts-destination``: a folder on the head by default, or a shared folder or object store
  URI that you give with ``--artifacts``), so workers need only its address.

Both bind to 127.0.0.1 unless ``--host`` says otherwise (``--host 0.0.0.0`` or the head's address for
workers on other machines); the MLflow server accepts only the ``Host`` headers that reach it
(``--allowed-hosts``). ``start`` prints ``export MLFLOW_TRACKING_URI=...`` and ``export
PRUNEGRID_OPTUNA_STORAGE=...`` on stdout (``eval "$(bash scripts/head.sh start)"``), and is idempotent;
``stop`` stops both and keeps the data. Without a head, one machine keeps the embedded SQLite default.

PostgreSQL refuses to run as root: as root, its programs run as the ``postgres`` system user, and a
cluster folder that user cannot reach is kept under ``/var/tmp/prunegrid-postgres/`` instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from prunegrid.cli import ArgumentParser, guard
from prunegrid.errors import ConfigError

DEFAULT_DIR = ".prunegrid/head"
STATE = "head.json"
ROLE = "prunegrid"
DATABASES = ("mlflow", "optuna")


@dataclass
class HeadInfo:
    dir: str
    host: str
    pg_port: int
    mlflow_port: int
    artifacts: str
    tracking_uri: str
    optuna_storage: str
    backend_store_uri: str


# -- PostgreSQL -------------------------------------------------------------------------------------
def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]) if
                   p.parts[-3].isdigit() else 0)
    path = str(found[-1]) if found else shutil.which(name)
    if not path:
        raise ConfigError(f"PostgreSQL's {name} is not installed; install Debian's postgresql "
                          "(apt-get install postgresql)")
    return path


def _pg_user() -> str | None:
    """The system user PostgreSQL runs as: ``postgres`` when we are root (it refuses root), else us."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        raise ConfigError("running as root needs the 'postgres' system user (Debian's postgresql package "
                          "creates it)") from None
    return "postgres"


def _pg(args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    user = _pg_user()
    res = subprocess.run(args, user=user, cwd="/", capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise ConfigError(f"{Path(args[0]).name} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    return res


def _reachable_by_pg(path: Path) -> bool:
    if _pg_user() is None:
        return True
    return subprocess.run(["test", "-x", str(path)], user="postgres", cwd="/").returncode == 0


def _own(path: Path) -> None:
    if _pg_user() is not None:
        shutil.chown(path, "postgres", "postgres")


def _cluster_dirs(head_dir: Path) -> tuple[Path, Path]:
    """The cluster's data folder and its (short) socket folder."""
    key = hashlib.md5(str(head_dir).encode()).hexdigest()[:10]
    data = head_dir / "postgres"
    if not _reachable_by_pg(head_dir):
        data = Path("/var/tmp/prunegrid-postgres") / key
    return data, Path("/tmp") / f"prunegrid-pg-{key}"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host != "0.0.0.0" else "", 0))
        return s.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0


def _start_postgres(state: dict) -> None:
    data, sock = Path(state["pg_data"]), Path(state["pg_socket"])
    for d in (data.parent, sock):
        d.mkdir(parents=True, exist_ok=True)
    _own(sock)
    os.chmod(sock, 0o700)
    fresh = not (data / "PG_VERSION").is_file()
    if fresh:
        data.mkdir(parents=True, exist_ok=True)
        _own(data)
        _pg([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--auth-local=trust",
             "--auth-host=scram-sha-256"])
        if state["host"] not in ("127.0.0.1", "localhost"):
            with open(data / "pg_hba.conf", "a") as f:
                f.write("host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n")
    status = _pg([_pg_bin("pg_ctl"), "-D", str(data), "status"], check=False)
    if status.returncode != 0:
        log = Path(state["pg_log"])
        log.touch()
        _own(log)
        opts = f"-c listen_addresses='{state['host']}' -p {state['pg_port']} -k {sock}"
        res = _pg([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start"],
                  check=False)
        if res.returncode != 0:
            last = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
            raise ConfigError(f"PostgreSQL did not start: {' '.join(last) or res.stderr.strip()} (log: {log})")
    if fresh:
        psql = [_pg_bin("psql"), "-h", str(sock), "-p", str(state["pg_port"]), "-U", "postgres", "-d", "postgres",
                "-v", "ON_ERROR_STOP=1", "-q", "-c"]
        _pg([*psql, f"CREATE ROLE {ROLE} LOGIN PASSWORD '{state['password']}'"])
        for db in DATABASES:
            _pg([*psql, f"CREATE DATABASE {db} OWNER {ROLE}"])


def _stop_postgres(state: dict) -> bool:
    data = Path(state["pg_data"])
    if not (data / "PG_VERSION").is_file():
        return False
    if _pg([_pg_bin("pg_ctl"), "-D", str(data), "status"], check=False).returncode != 0:
        return False
    _pg([_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], check=False)
    return True


# -- MLflow server ----------------------------------------------------------------------------------
def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _healthy(info: HeadInfo) -> bool:
    try:
        with urllib.request.urlopen(f"{info.tracking_uri}/health", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def _start_mlflow(state: dict, info: HeadInfo, wait_s: float) -> None:
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri", info.backend_store_uri,
           "--artifacts-destination", info.artifacts, "--host", info.host, "--port", str(info.mlflow_port),
           "--workers", "1", "--allowed-hosts", ",".join(state["allowed_hosts"])]
    log = open(Path(info.dir) / "mlflow.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    state["mlflow_pid"] = proc.pid
    _save(Path(info.dir), state)
    t0 = time.time()
    while time.time() - t0 < wait_s:
        if proc.poll() is not None:
            raise ConfigError(f"the MLflow server stopped at start (exit {proc.returncode}); see "
                              f"{Path(info.dir) / 'mlflow.log'}")
        if _healthy(info):
            return
        time.sleep(0.5)
    raise ConfigError(f"the MLflow server did not answer within {wait_s:.0f} s; see {Path(info.dir) / 'mlflow.log'}")


def _stop_mlflow(state: dict) -> bool:
    pid = state.get("mlflow_pid")
    if not _alive(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return False
    for _ in range(50):
        if not _alive(pid):
            return True
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    return True


# -- state -----------------------------------------------------------------------------------------
def _save(head_dir: Path, state: dict) -> None:
    path = head_dir / STATE
    path.write_text(json.dumps(state, indent=1))
    os.chmod(path, 0o600)


def _load(head_dir: Path) -> dict | None:
    path = head_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def _info(state: dict) -> HeadInfo:
    host, client_host = state["host"], "127.0.0.1" if state["host"] in ("0.0.0.0", "") else state["host"]
    pg = f"postgresql+psycopg2://{ROLE}:{state['password']}@{client_host}:{state['pg_port']}"
    return HeadInfo(dir=state["dir"], host=host, pg_port=state["pg_port"], mlflow_port=state["mlflow_port"],
                    artifacts=state["artifacts"], tracking_uri=f"http://{client_host}:{state['mlflow_port']}",
                    optuna_storage=f"{pg}/optuna", backend_store_uri=f"{pg}/mlflow")


def _port(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ConfigError(f"{name}={value!r} must be a port number (0: a free one)")
    return value


def start(dir: str | Path = DEFAULT_DIR, host: str = "127.0.0.1", mlflow_port: int = 5000, pg_port: int = 5432,
          artifacts: str | None = None, allowed_hosts: list[str] | str | None = None,
          wait_s: float = 180) -> HeadInfo:
    """Start PostgreSQL and the MLflow server (those not running yet); return their addresses."""
    head_dir = Path(dir).expanduser().resolve()
    try:
        head_dir.mkdir(parents=True, exist_ok=True)
        probe = head_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--dir {dir}: cannot write there ({exc.strerror})") from None
    state = _load(head_dir)
    if state is None:
        pg_port, mlflow_port = _port(pg_port, "--pg-port"), _port(mlflow_port, "--port")
        pg_data, pg_socket = _cluster_dirs(head_dir)
        mlflow_port = mlflow_port or _free_port(host)
        pg_port = pg_port or _free_port(host)
        for name, port in (("--pg-port", pg_port), ("--port", mlflow_port)):
            if _listening(host, port):
                raise ConfigError(f"{name} {port} is already in use on {host}; choose another (0: a free one)")
        art = artifacts or str(head_dir / "artifacts")
        if "://" not in art:
            Path(art).mkdir(parents=True, exist_ok=True)
            art = str(Path(art).resolve())
        names = allowed_hosts.split(",") if isinstance(allowed_hosts, str) else list(allowed_hosts or [])
        if not names:
            hosts = {"127.0.0.1", "localhost"} | ({host, socket.gethostname()} if host not in ("127.0.0.1",) else set())
            hosts.discard("0.0.0.0")
            names = sorted(f"{h}:{mlflow_port}" for h in hosts) + sorted(hosts)
        state = {"dir": str(head_dir), "host": host, "pg_port": pg_port, "mlflow_port": mlflow_port,
                 "artifacts": art, "password": secrets.token_urlsafe(18), "pg_data": str(pg_data),
                 "pg_socket": str(pg_socket), "pg_log": str(pg_data.parent / f"{pg_data.name}.log"),
                 "allowed_hosts": names, "mlflow_pid": None}
        _save(head_dir, state)
    info = _info(state)
    _start_postgres(state)
    if not (_alive(state.get("mlflow_pid")) and _healthy(info)):
        _start_mlflow(state, info, wait_s)
    return info


def stop(dir: str | Path = DEFAULT_DIR) -> bool:
    """Stop the MLflow server and PostgreSQL; the data stays. True if something was running."""
    state = _load(Path(dir).expanduser().resolve())
    if state is None:
        return False
    stopped = _stop_mlflow(state)
    return _stop_postgres(state) or stopped


def status(dir: str | Path = DEFAULT_DIR) -> HeadInfo | None:
    """The head's addresses when both servers answer, else None."""
    state = _load(Path(dir).expanduser().resolve())
    if state is None:
        return None
    info = _info(state)
    return info if _healthy(info) and _listening(info.host, info.pg_port) else None


def env_lines(info: HeadInfo) -> list[str]:
    return [f"export MLFLOW_TRACKING_URI={info.tracking_uri}", f"export PRUNEGRID_OPTUNA_STORAGE={info.optuna_storage}"]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m prunegrid.head",
                            description="The head node's shared state: PostgreSQL and an MLflow tracking server on "
                                        "it (start prints the export lines to eval).")
    parser.add_argument("action", choices=["start", "stop", "status", "env"])
    parser.add_argument("--dir", default=DEFAULT_DIR, help=f"state folder (default {DEFAULT_DIR})")
    parser.add_argument("--host", default="127.0.0.1", help="address both servers bind to (default 127.0.0.1; "
                                                           "0.0.0.0 for workers on other machines)")
    parser.add_argument("--port", type=int, default=5000, help="MLflow server port (default 5000; 0: a free one)")
    parser.add_argument("--pg-port", type=int, default=5432, help="PostgreSQL port (default 5432; 0: a free one)")
    parser.add_argument("--artifacts", default=None, help="artifact store: a folder (default <dir>/artifacts; on "
                                                          "several machines a shared one) or a URI (s3://...)")
    parser.add_argument("--allowed-hosts", default=None, help="Host headers the MLflow server accepts "
                                                              "(comma-separated; default: the names that reach it)")
    args = parser.parse_args(argv)
    with guard():
        if args.action == "start":
            info = start(args.dir, args.host, args.port, args.pg_port, args.artifacts, args.allowed_hosts)
            print("\n".join(env_lines(info)))
            print(f"prunegrid: head in {info.dir}: MLflow {info.tracking_uri} (UI and API; artifacts in "
                  f"{info.artifacts}), PostgreSQL on {info.host}:{info.pg_port} (databases mlflow, optuna); logs "
                  f"{info.dir}/mlflow.log and {_load(Path(info.dir))['pg_log']}; stop: python -m prunegrid.head stop "
                  f"--dir {args.dir}",
                  file=sys.stderr)
        elif args.action == "stop":
            print("prunegrid: head stopped" if stop(args.dir) else "prunegrid: no head was running", file=sys.stderr)
        else:
            info = status(args.dir)
            if info is None:
                print(f"prunegrid: no head running in {args.dir}", file=sys.stderr)
                return 1
            if args.action == "env":
                print("\n".join(env_lines(info)))
            else:
                print(json.dumps({k: v for k, v in asdict(info).items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
