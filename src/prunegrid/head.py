"""``python -m prunegrid.head start`` / ``bash scripts/head.sh start``: the shared state of a cluster.

One machine (the head) runs what every worker of a Ray grid or a distributed sweep writes to:

- **PostgreSQL** (Debian's ``postgresql``), a cluster of its own under ``--dir``, with a role
  ``prunegrid`` (a random password, kept in ``<dir>/head.json``, mode 0600) and two databases:
  ``mlflow`` (the tracking server's backend store) and ``optuna`` (the sweeps' studies). Host
  connections need the password (scram-sha-256).
- **An MLflow tracking server** on that PostgreSQL, with proxied artifact storage
  (``--artifacts-destination``: a folder on the head by default, or a shared folder or object store
  URI that you give with ``--artifacts``), so workers need only its address. MLflow's GenAI job runner
  is left off (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true`` in the environment turns it on).

Both bind to 127.0.0.1 unless ``--host`` says otherwise (``--host 0.0.0.0`` or the head's address for
workers on other machines); the MLflow server accepts only the ``Host`` headers that reach it
(``--allowed-hosts``; browser requests from those origins too). ``start`` prints ``export
MLFLOW_TRACKING_URI=...`` and ``export PRUNEGRID_OPTUNA_STORAGE=...`` on stdout (``eval "$(bash
scripts/head.sh start)"``) and is idempotent; ``stop`` stops both and keeps the data. A later ``start``
reuses the data and the settings it was given before, except those given again. Without a head, one
machine keeps the embedded SQLite default.

PostgreSQL refuses to run as root: as root, its programs run as the ``postgres`` system user, and a
cluster folder that user cannot reach is kept under ``/var/tmp/prunegrid-postgres/`` instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
DEFAULTS = {"host": "127.0.0.1", "mlflow_port": 5000, "pg_port": 5432}
STATE = "head.json"
ROLE = "prunegrid"
DATABASES = ("mlflow", "optuna")
LOOPBACK = ("127.0.0.1", "localhost")
HBA_BEGIN, HBA_END = "# prunegrid head: host connections from other machines", "# end prunegrid head"
_PROCS: dict[int, subprocess.Popen] = {}  # MLflow servers started by this process (reaped when they end)


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
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                   key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    path = str(found[-1]) if found else shutil.which(name)
    if not path:
        raise ConfigError(f"PostgreSQL's {name} is not installed; install Debian's postgresql "
                          "(apt-get install postgresql)")
    return path


def _pg_user() -> str | None:
    """The system user PostgreSQL runs as: ``postgres`` when we are root (it refuses root), else us."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ConfigError("running as root needs the 'postgres' system user (Debian's postgresql package "
                          "creates it)") from None
    return "postgres"


def _pg(args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(args, user=_pg_user(), cwd="/", capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        last = (res.stderr or res.stdout).strip().splitlines()[-1:]
        raise ConfigError(f"{Path(args[0]).name} failed: {' '.join(last) or f'exit {res.returncode}'}")
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


def _pg_running(state: dict) -> bool:
    data = Path(state["pg_data"])
    return (data / "PG_VERSION").is_file() and _pg([_pg_bin("pg_ctl"), "-D", str(data), "status"],
                                                     check=False).returncode == 0


def _write_hba(data: Path, host: str) -> None:
    """Password connections from any address only when bound beyond loopback (initdb's lines cover loopback)."""
    path = data / "pg_hba.conf"
    lines, skip = [], False
    for line in path.read_text().splitlines():
        skip = skip or line == HBA_BEGIN
        if not skip:
            lines.append(line)
        skip = skip and line != HBA_END
    if host not in LOOPBACK:
        lines += [HBA_BEGIN, "host all all 0.0.0.0/0 scram-sha-256", "host all all ::/0 scram-sha-256", HBA_END]
    with open(path, "w") as f:  # in place: the file stays the postgres user's
        f.write("\n".join(lines) + "\n")


def _setup_sql(password: str) -> str:
    dbs = ",".join(f"'{db}'" for db in DATABASES)
    return (f"SELECT 'CREATE ROLE {ROLE} LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}')"
            f"\\gexec\nALTER ROLE {ROLE} LOGIN PASSWORD '{password}';\n"
            f"SELECT format('CREATE DATABASE %I OWNER {ROLE}', d) FROM unnest(ARRAY[{dbs}]) AS d "
            f"WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = d)\\gexec\n")


def _start_postgres(state: dict) -> None:
    data, sock, log = Path(state["pg_data"]), Path(state["pg_socket"]), Path(state["pg_log"])
    if not data.parent.exists():
        data.parent.mkdir(parents=True)
        os.chmod(data.parent, 0o755)
    sock.mkdir(parents=True, exist_ok=True)
    _own(sock)
    os.chmod(sock, 0o700)
    if not (data / "PG_VERSION").is_file():
        data.mkdir(exist_ok=True)
        _own(data)
        _pg([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--auth-local=trust",
             "--auth-host=scram-sha-256"])
    _write_hba(data, state["host"])
    log.touch()
    _own(log)
    opts = f"-c listen_addresses='{state['host']}' -p {state['pg_port']} -k {sock}"
    res = _pg([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start"],
              check=False)
    if res.returncode != 0:
        last = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
        raise ConfigError(f"PostgreSQL did not start: {' '.join(last) or res.stderr.strip()} (log: {log})")
    _pg([_pg_bin("psql"), "-h", str(sock), "-p", str(state["pg_port"]), "-U", "postgres", "-d", "postgres",
         "-v", "ON_ERROR_STOP=1", "-q"], input=_setup_sql(state["password"]))


def _stop_postgres(state: dict) -> bool:
    if not _pg_running(state):
        return False
    _pg([_pg_bin("pg_ctl"), "-D", state["pg_data"], "-m", "fast", "-w", "stop"], check=False)
    return True


# -- MLflow server ----------------------------------------------------------------------------------
def _mlflow_alive(pid: int | None) -> bool:
    """Process ``pid`` runs and is an MLflow server (not a zombie of ours, not a pid reused after a reboot)."""
    if not pid:
        return False
    if pid in _PROCS:  # our child (maybe not yet exec'd into mlflow)
        if _PROCS[pid].poll() is None:
            return True
        del _PROCS[pid]
        return False
    proc = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            return b"mlflow" in proc.read_bytes()
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _healthy(info: HeadInfo) -> bool:
    try:
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # not through an http_proxy
        with direct.open(f"{info.tracking_uri}/health", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def _machine_names() -> set[str]:
    """This machine's host names and IPv4 addresses: what workers on other machines call it."""
    names = {socket.gethostname(), socket.getfqdn()}
    try:
        names |= {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: the address of the outgoing interface
            names.add(s.getsockname()[0])
        except OSError:
            pass
    return {n for n in names if n}


def _allowed_hosts(state: dict) -> list[str]:
    if state.get("allowed_hosts_arg"):
        return list(state["allowed_hosts_arg"])
    names = set(LOOPBACK)
    if state["host"] not in LOOPBACK:
        names |= _machine_names() if state["host"] == "0.0.0.0" else {state["host"]}
    return sorted(f"{n}:{state['mlflow_port']}" for n in names)


def _start_mlflow(state: dict, info: HeadInfo, wait_s: float) -> None:
    mlflow = Path(sys.executable).parent / "mlflow"
    hosts = _allowed_hosts(state)
    origins = [f"{scheme}://{h}" for h in hosts if h != "*" and h.split(":")[0] not in LOOPBACK
               for scheme in ("http", "https")]
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri", info.backend_store_uri,
           "--serve-artifacts", "--artifacts-destination", info.artifacts, "--host", info.host,
           "--port", str(info.mlflow_port), "--workers", "1", "--allowed-hosts", ",".join(hosts),
           *(["--cors-allowed-origins", ",".join(origins)] if origins else [])]
    env = {**os.environ}
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    with open(Path(info.dir) / "mlflow.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    _PROCS[proc.pid] = proc
    state["mlflow_pid"] = proc.pid
    _save(Path(info.dir), state)
    if not _wait_healthy(info, proc.pid, wait_s):
        if _mlflow_alive(proc.pid):
            raise ConfigError(f"the MLflow server did not answer within {wait_s:.0f} s; see "
                              f"{Path(info.dir) / 'mlflow.log'}")
        raise ConfigError(f"the MLflow server stopped at start (exit {proc.returncode}); see "
                          f"{Path(info.dir) / 'mlflow.log'}")


def _wait_healthy(info: HeadInfo, pid: int, wait_s: float) -> bool:
    """Wait until the server answers /health (True), or it ends or ``wait_s`` passes (False)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and _mlflow_alive(pid):
        if _healthy(info):
            return True
        time.sleep(0.3)
    return False


def _group_gone(pgid: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        if pgid in _PROCS:
            _PROCS[pgid].poll()  # reap our own child: a zombie still counts as a member of the group
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _stop_mlflow(state: dict, grace_s: float = 10.0) -> bool:
    """SIGTERM to the server's process group, SIGKILL after ``grace_s``."""
    pid = state.get("mlflow_pid")
    if not _mlflow_alive(pid):
        return False
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        if _group_gone(pid, wait_s):
            break
    _PROCS.pop(pid, None)
    return True


# -- state -----------------------------------------------------------------------------------------
def _save(head_dir: Path, state: dict) -> None:
    path = head_dir / STATE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state, indent=1))
    os.chmod(path, 0o600)


def _load(head_dir: str | Path) -> dict | None:
    path = Path(head_dir).expanduser().resolve() / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def _info(state: dict) -> HeadInfo:
    host, client_host = state["host"], "127.0.0.1" if state["host"] in ("0.0.0.0", "") else state["host"]
    pg = f"postgresql+psycopg2://{ROLE}:{state['password']}@{client_host}:{state['pg_port']}"
    return HeadInfo(dir=state["dir"], host=host, pg_port=state["pg_port"], mlflow_port=state["mlflow_port"],
                    artifacts=state["artifacts"], tracking_uri=f"http://{client_host}:{state['mlflow_port']}",
                    optuna_storage=f"{pg}/optuna", backend_store_uri=f"{pg}/mlflow")


def _port(value: int | None, name: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535):
        raise ConfigError(f"{name}={value!r} must be a port number (0: a free one)")
    return value


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind(("" if host == "0.0.0.0" else host, 0))
        return s.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0


def _artifacts(value: str) -> str:
    if "://" in value:
        return value
    path = Path(value).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--artifacts {value}: cannot create it ({exc.strerror})") from None
    return str(path)


def _writable(head_dir: Path, given: str | Path) -> None:
    try:
        head_dir.mkdir(parents=True, exist_ok=True)
        probe = head_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--dir {given}: cannot write there ({exc.strerror})") from None


def start(dir: str | Path = DEFAULT_DIR, host: str | None = None, mlflow_port: int | None = None,
          pg_port: int | None = None, artifacts: str | None = None, allowed_hosts: list[str] | str | None = None,
          wait_s: float = 180) -> HeadInfo:
    """Start PostgreSQL and the MLflow server (those not running yet); return their addresses.

    A setting left None is the one this head had before, else the default (127.0.0.1, port 5000,
    PostgreSQL port 5432, ``<dir>/artifacts``, the names that reach the server); port 0 picks a free
    port. While the head runs, a setting other than the running one is an error (stop it first).
    """
    head_dir = Path(dir).expanduser().resolve()
    _writable(head_dir, dir)
    mlflow_port, pg_port = _port(mlflow_port, "--port"), _port(pg_port, "--pg-port")
    if host is not None and not re.fullmatch(r"[A-Za-z0-9._:-]+", host):
        raise ConfigError(f"--host {host!r} is not an address or a host name")
    if isinstance(allowed_hosts, str):
        allowed_hosts = [h.strip() for h in allowed_hosts.split(",") if h.strip()]
    if artifacts is not None:
        artifacts = _artifacts(artifacts)
    given = {"host": host, "mlflow_port": mlflow_port or None, "pg_port": pg_port or None, "artifacts": artifacts,
             "allowed_hosts_arg": allowed_hosts or None}
    state = _load(head_dir)
    pg_up = state is not None and _pg_running(state)
    mlflow_up = state is not None and _mlflow_alive(state.get("mlflow_pid"))
    if pg_up or mlflow_up:
        changed = [k for k, v in given.items() if v is not None and v != state.get(k)]
        if changed:
            names = {"mlflow_port": "--port", "pg_port": "--pg-port", "allowed_hosts_arg": "--allowed-hosts"}
            flags = ", ".join(names.get(k, f"--{k}") for k in changed)
            raise ConfigError(f"the head in {head_dir} is running with other {flags}; stop it first "
                              f"(python -m prunegrid.head stop --dir {dir})")
    else:
        new = state is None
        if new:
            pg_data, pg_socket = _cluster_dirs(head_dir)
            state = {"dir": str(head_dir), **DEFAULTS, "artifacts": None, "allowed_hosts_arg": None,
                     "password": secrets.token_urlsafe(18), "pg_data": str(pg_data), "pg_socket": str(pg_socket),
                     "pg_log": str(pg_data.parent / f"{pg_data.name}.log"), "mlflow_pid": None}
        state.update({k: v for k, v in given.items() if v is not None})
        state["artifacts"] = state["artifacts"] or _artifacts(str(head_dir / "artifacts"))
        for key, flag, value in (("pg_port", "--pg-port", pg_port), ("mlflow_port", "--port", mlflow_port)):
            if value == 0 and (new or _listening(state["host"], state[key])):  # a restart keeps a free port it had
                state[key] = _free_port(state["host"])
            elif _listening(state["host"], state[key]):
                raise ConfigError(f"{flag} {state[key]} is already in use on {state['host']}; choose another "
                                  "(0: a free one)")
        _save(head_dir, state)
    info = _info(state)
    if not pg_up:
        _start_postgres(state)
    if not (mlflow_up and _wait_healthy(info, state["mlflow_pid"], wait_s)):  # a start cut short may still be on
        _stop_mlflow(state)
        _start_mlflow(state, info, wait_s)
    return info


def stop(dir: str | Path = DEFAULT_DIR) -> bool:
    """Stop the MLflow server and PostgreSQL; the data stays. True if something was running."""
    head_dir = Path(dir).expanduser().resolve()
    state = _load(head_dir)
    if state is None:
        return False
    stopped = _stop_mlflow(state)
    if state.get("mlflow_pid") is not None:
        state["mlflow_pid"] = None
        _save(head_dir, state)
    return _stop_postgres(state) or stopped


def status(dir: str | Path = DEFAULT_DIR) -> HeadInfo | None:
    """The head's addresses when both servers answer, else None."""
    state = _load(dir)
    if state is None:
        return None
    info = _info(state)
    return info if _healthy(info) and _listening(info.host, info.pg_port) else None


def env_lines(info: HeadInfo) -> list[str]:
    """The shell lines that point a process at the head (``eval`` them)."""
    return [f"export MLFLOW_TRACKING_URI={info.tracking_uri}", f"export PRUNEGRID_OPTUNA_STORAGE={info.optuna_storage}"]


def _describe(info: HeadInfo, stop_dir: str) -> str:
    state = _load(info.dir) or {}
    lines = [f"prunegrid: head in {info.dir}",
             f"  MLflow UI and API: {info.tracking_uri} (bound to {info.host}; allowed hosts: "
             f"{','.join(_allowed_hosts(state))})",
             f"  artifacts: {info.artifacts}",
             f"  PostgreSQL: {info.host}:{info.pg_port} (databases {', '.join(DATABASES)}; role {ROLE}, "
             f"password in {Path(info.dir) / STATE})",
             f"  logs: {Path(info.dir) / 'mlflow.log'}, {state.get('pg_log')}"]
    if info.host not in LOOPBACK:
        fqdn = socket.getfqdn()
        name = (info.host if info.host != "0.0.0.0" else fqdn if "." in fqdn and not fqdn.startswith("localhost")
                else socket.gethostname())
        remote = _info({**state, "host": name})
        lines.append(f"  on workers: {'; '.join(env_lines(remote))}")
        if "://" not in info.artifacts:
            lines.append("  (the artifacts folder is the head's: workers log artifacts through the server)")
    lines.append(f"  stop: python -m prunegrid.head stop --dir {stop_dir}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m prunegrid.head",
                            description="The head node's shared state: PostgreSQL and an MLflow tracking server on "
                                        "it (start prints the export lines to eval). Settings not given are the "
                                        "head's previous ones, else the defaults.")
    parser.add_argument("action", choices=["start", "stop", "status", "env"])
    parser.add_argument("--dir", default=DEFAULT_DIR, help=f"state folder (default {DEFAULT_DIR})")
    parser.add_argument("--host", default=None, help="address both servers bind to (default 127.0.0.1; "
                                                     "0.0.0.0 for workers on other machines)")
    parser.add_argument("--port", type=int, default=None, help="MLflow server port (default 5000; 0: a free one)")
    parser.add_argument("--pg-port", type=int, default=None, help="PostgreSQL port (default 5432; 0: a free one)")
    parser.add_argument("--artifacts", default=None, help="artifact store: a folder (default <dir>/artifacts; on "
                                                          "several machines a shared one) or a URI (s3://...)")
    parser.add_argument("--allowed-hosts", default=None, help="Host headers the MLflow server accepts, "
                                                              "comma-separated, wildcards allowed (default: "
                                                              "host:port for the names that reach it)")
    args = parser.parse_args(argv)
    with guard():
        if args.action == "start":
            info = start(args.dir, args.host, args.port, args.pg_port, args.artifacts, args.allowed_hosts)
            print("\n".join(env_lines(info)), flush=True)
            print(_describe(info, args.dir), file=sys.stderr)
        elif args.action == "stop":
            print("prunegrid: head stopped (the data stays)" if stop(args.dir) else "prunegrid: no head was running",
                  file=sys.stderr)
        else:
            info = status(args.dir)
            if info is None:
                print(f"prunegrid: no head running in {args.dir}", file=sys.stderr)
                return 1
            if args.action == "env":
                print("\n".join(env_lines(info)))
            else:
                print(json.dumps(asdict(info), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
