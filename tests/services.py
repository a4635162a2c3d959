"""Real services for the tests, started the way users start them and stopped by whoever started them.

* ``RayCluster``: ``ray start --head`` plus ``ray start --address ... --temp-dir <own dir>`` per extra node, each
  node in its own process session so that exactly its processes can be stopped (or SIGKILLed, to fail a node);
  token authentication on.
* ``S3Server``: moto's standalone server speaking the S3 HTTP protocol on 127.0.0.1.
* ``Postgres``: a throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl`` in a temporary directory, as the
  ``postgres`` user when the tests run as root).
* ``MlflowServer``: ``mlflow server`` with a PostgreSQL backend store, proxied artifacts on the S3 server, and
  MLflow's basic authentication.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (everything a command started with start_new_session launched)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid:
                pids.append(int(entry.name))
    return pids


def stop_session(sid: int, first: signal.Signals = signal.SIGTERM) -> None:
    """Signal every process of a session, SIGKILL what is left after 5 s, and wait until none is left."""
    for sig, wait in ((first, 5.0), (signal.SIGKILL, 5.0)):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while session_pids(sid) and time.time() < deadline:
            time.sleep(0.2)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status < 500
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------ Ray


class RayCluster:
    """A Ray cluster of ``len(node_cpus)`` nodes on this machine, every port explicit, token auth on."""

    def __init__(self, node_cpus=(4,), env: dict | None = None, token: str | None = None):
        self.node_cpus = list(node_cpus)
        self.token = token or os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
        self.base_env = dict(env or os.environ)
        self.base_env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "PYTHONUNBUFFERED": "1",
                              "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"})
        self.base_env.pop("RAY_ADDRESS", None)
        self.base_env.pop("MLFLOW_TRACKING_URI", None)
        self.ray = str(BIN / "ray")
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths are limited
        self.sessions: list[int | None] = []
        self.port = self.dash_port = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    @property
    def env(self) -> dict:
        """Environment of a client of this cluster (the token included)."""
        return dict(self.base_env, RAY_TMPDIR=str(self.root / "n0"))

    def _ports(self) -> list[str]:
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]

    def _start_node(self, i: int) -> int:
        tmp = self.root / f"n{i}"
        tmp.mkdir(exist_ok=True)
        env = dict(self.base_env, RAY_TMPDIR=str(tmp))
        if i == 0:
            self.port, self.dash_port = free_port(), free_port()
            args = ["--head", f"--port={self.port}", "--include-dashboard=true", f"--dashboard-port={self.dash_port}",
                    "--dashboard-host=127.0.0.1"]
        else:
            args = [f"--address={self.address}"]
        # The head takes Ray's default temp dir under RAY_TMPDIR, where it records its address for clients on this
        # machine (`ray.init()` without an address, `train` without RAY_ADDRESS); other nodes need their own dirs.
        own_dir = [] if i == 0 else [f"--temp-dir={tmp}"]
        proc = subprocess.Popen([self.ray, "start", *args, f"--num-cpus={self.node_cpus[i]}", *own_dir,
                                 "--disable-usage-stats", *self._ports()], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            stop_session(proc.pid)
            raise RuntimeError(f"ray start (node {i}) failed:\n{out[-3000:]}")
        return proc.pid  # the session id: the node's daemons keep it after `ray start` exits

    def start(self) -> RayCluster:
        self.sessions = []
        for i in range(len(self.node_cpus)):
            self.sessions.append(self._start_node(i))
        if len(self.node_cpus) > 1:
            wait_for(lambda: self.alive_nodes() == len(self.node_cpus), 60, "all nodes to join")
        return self

    def alive_nodes(self) -> int:
        r = subprocess.run([self.ray, "status", f"--address={self.address}"], env=self.env, capture_output=True,
                           text=True, timeout=60)
        active = r.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if line.strip().startswith("1 node_"))

    def kill_node(self, i: int) -> None:
        """SIGKILL node i's raylet and everything else of that node, at once (a machine that died)."""
        sid = self.sessions[i]
        if sid is not None:
            stop_session(sid, first=signal.SIGKILL)
            self.sessions[i] = None

    def stop(self) -> None:
        for i in reversed(range(len(self.sessions))):
            sid = self.sessions[i]
            if sid is not None:
                stop_session(sid)
                self.sessions[i] = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def submit(self, *entrypoint: str, working_dir: str | Path, env: dict | None = None,
               runtime_env: dict | None = None, no_wait: bool = False, timeout: float = 600,
               extra: tuple = ()) -> subprocess.CompletedProcess:
        """`ray job submit` to this cluster (retried while the job agent has not registered yet)."""
        import json

        args = [self.ray, "job", "submit", "--address", self.dashboard, "--working-dir", str(working_dir), *extra]
        if runtime_env:
            args += ["--runtime-env-json", json.dumps(runtime_env)]
        if no_wait:
            args.append("--no-wait")
        for _ in range(12):
            r = subprocess.run([*args, "--", *entrypoint], env=env or self.env, capture_output=True, text=True,
                               timeout=timeout)
            if "No available agent" not in r.stderr + r.stdout:
                return r
            time.sleep(5)
        return r


# ------------------------------------------------------------------------------------------------- S3


class S3Server:
    """moto's S3 server on 127.0.0.1; ``env`` points AWS clients (boto3, pyarrow) at it."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
        self.proc = None

    def start(self) -> S3Server:
        exe = BIN / "moto_server"
        if not exe.exists():
            raise RuntimeError("moto_server is not installed; install the test extras: pip install -e '.[dev]'")
        self.log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: _http_ok(self.endpoint + "/moto-api/"), 60, "the S3 server")
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out, token = [], None
        c = self.client()
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = c.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]

    def stop(self) -> None:
        if self.proc is not None:
            stop_session(self.proc.pid)
            self.proc = None
            os.unlink(self.log.name)


# ----------------------------------------------------------------------------------------------- Postgres


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name)
                                                                        else [])
    if not found:
        raise RuntimeError("PostgreSQL is not installed; install Debian's package: apt-get install -y postgresql")
    return found[-1]


class Postgres:
    """A PostgreSQL server in a temporary directory on 127.0.0.1, with one database and one password user."""

    def __init__(self, db: str = "mlflow", user: str = "mlflow"):
        self.db, self.user, self.password = db, user, secrets.token_hex(12)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def uri(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.db}"

    def _run(self, *args: str, timeout: float = 120) -> str:
        r = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {r.stderr[-2000:]}")
        return r.stdout

    def start(self) -> Postgres:
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            shutil.chown(pwfile, "postgres", "postgres")
        self._run(_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                  f"--pwfile={pwfile}", "-E", "UTF8")
        self._run(_pg_bin("pg_ctl"), "-D", str(data), "-l", str(self.dir / "log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        env = dict(os.environ, PGPASSWORD=self.password)
        psql = [_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        for sql in (f"CREATE USER {self.user} PASSWORD '{self.password}'",
                    f"CREATE DATABASE {self.db} OWNER {self.user}",
                    f"CREATE DATABASE {self.db}_auth OWNER {self.user}"):
            r = subprocess.run([*psql, "-c", sql], env=env, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"psql failed: {r.stderr[-2000:]}")
        return self

    def stop(self) -> None:
        data = self.dir / "data"
        if (data / "postmaster.pid").exists():
            subprocess.run([*self.as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, timeout=120, cwd=self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- MLflow


class MlflowServer:
    """``mlflow server`` on PostgreSQL with artifacts proxied to S3, behind MLflow's basic authentication."""

    def __init__(self, pg: Postgres, artifacts: str, s3_env: dict):
        self.pg, self.artifacts, self.s3_env = pg, artifacts, s3_env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.user, self.password = "admin", secrets.token_hex(12)
        self.dir = Path(tempfile.mkdtemp(prefix="mlf", dir="/tmp"))
        self.proc = None

    @property
    def client_env(self) -> dict:
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": self.user,
                "MLFLOW_TRACKING_PASSWORD": self.password}

    def start(self) -> MlflowServer:
        auth_db = self.pg.uri + "_auth"
        ini = self.dir / "auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {auth_db}\nadmin_username = {self.user}\n"
                       f"admin_password = {self.password}\nauthorization_function = "
                       f"mlflow.server.auth:authenticate_request_basic_auth\n")
        env = dict(os.environ, **self.s3_env, MLFLOW_AUTH_CONFIG_PATH=str(ini),
                   MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(k, None)
        self.log = open(self.dir / "server.log", "w")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", self.pg.uri, "--artifacts-destination",
             self.artifacts, "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", "--app-name",
             "basic-auth"], env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.dir)
        try:
            wait_for(lambda: self.proc.poll() is not None or _http_ok(self.url + "/health"), 180, "the MLflow server")
        finally:
            if self.proc.poll() is not None:
                raise RuntimeError("mlflow server exited:\n" + (self.dir / "server.log").read_text()[-3000:])
        return self

    def client(self):
        """A client of this server; MlflowClient reads the credentials from this process's environment, which the
        fixture that started the server sets (``client_env``)."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def stop(self) -> None:
        if self.proc is not None:
            stop_session(self.proc.pid)
            self.proc = None
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
