"""cluster/: every file parses, and the image, versions, entry points, storage locations, credentials and resources
agree with each other and with the code (no network, no Kubernetes, no cloud)."""

import configparser
import fnmatch
import importlib.metadata
import importlib.util
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import ROOT

from stylegan_dist import sweep, train
from stylegan_dist.sweep_schema import load_sweep

CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "launcher"
# GPUs and vCPUs of the instance types the launcher file may use
INSTANCES = {"p4d.24xlarge": (8, 96), "p4de.24xlarge": (8, 96), "p5.48xlarge": (8, 192), "g5.48xlarge": (8, 192),
             "g6e.48xlarge": (8, 192), "m6i.4xlarge": (0, 16), "m6i.2xlarge": (0, 8)}
# What every Ray node needs to run a job that names only URIs and logs to the authenticated tracking server
POD_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "STYLEGAN_DIST_STORAGE",
           "STYLEGAN_CACHE_DIR", "STYLEGAN_WEIGHTS_DIR")
BUCKET_ENV = ("STYLEGAN_DIST_STORAGE", "STYLEGAN_CACHE_DIR", "STYLEGAN_WEIGHTS_DIR")
# Keys MLflow's basic-auth app reads from the ini at MLFLOW_AUTH_CONFIG_PATH
AUTH_INI_KEYS = {"default_permission", "database_uri", "admin_username", "admin_password", "authorization_function"}
SWEEPS = ("table1_configs", "table2_mixing", "table3_path_length", "table4_mapping_depth", "noise_ablation")


def _yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_yaml() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


def _dockerfile() -> str:
    return (CLUSTER / "Dockerfile").read_text()


def _pin(name: str) -> str:
    m = re.search(rf'"{re.escape(name)}(?:\[[^\]]*\])?==([0-9.]+)"', _dockerfile())
    assert m, f"cluster/Dockerfile does not pin {name}"
    return m.group(1)


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


def _image() -> str:
    version = re.search(r'^version = "([^"]+)"', _pyproject(), re.M).group(1)
    return f"stylegan-dist:{version}"  # the image is tagged with the package version


def _manifest(name: str) -> dict:
    docs = _yaml_docs(KUBERAY / name)
    assert len(docs) == 1
    return docs[0]


def _docs_of_kind(kind: str) -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _yaml_docs(p) if d["kind"] == kind]


def _one(kind: str, name: str) -> dict:
    (doc,) = [d for d in _docs_of_kind(kind) if d["metadata"]["name"] == name]
    return doc


def _containers(obj) -> list[dict]:
    """Every container spec anywhere in a manifest."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "containers" and isinstance(v, list):
                found.extend(v)
            else:
                found.extend(_containers(v))
    elif isinstance(obj, list):
        for v in obj:
            found.extend(_containers(v))
    return found


def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as kustomize reads an env file (blank lines and # comments skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path}: {line}"
            out[key] = value
    return out


def _secrets() -> dict[str, dict[str, str]]:
    """Secret name -> the keys (with example values) of the committed example of each generator env file."""
    out = {}
    for gen in _manifest("kustomization.yaml")["secretGenerator"]:
        data = {}
        for env in gen["envs"]:
            data.update(_env_file(KUBERAY / f"{env}.example"))
        out[gen["name"]] = data
    return out


def _configmaps() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["data"] for d in _docs_of_kind("ConfigMap")}


def _resolved_env(container: dict) -> dict[str, str]:
    """The container's environment with example values; every Secret and ConfigMap (key) it refers to must be
    defined in cluster/kuberay (the generators' example files, the ConfigMaps)."""
    secrets, configmaps = _secrets(), _configmaps()
    env = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(configmaps[src["configMapRef"]["name"]])
        else:
            name = src["secretRef"]["name"]
            assert name in secrets, f"envFrom names Secret {name}, which no secretGenerator makes"
            env.update(secrets[name])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"]
        if "secretKeyRef" in ref:
            name, key = ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]
            assert key in secrets.get(name, {}), f"{e['name']}: Secret {name} has no key {key}"
            env[e["name"]] = secrets[name][key]
        else:
            name, key = ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]
            assert key in configmaps.get(name, {}), f"{e['name']}: ConfigMap {name} has no key {key}"
            env[e["name"]] = configmaps[name][key]
    return env


def _expand(text: str, env: dict[str, str]) -> str:
    """Shell-style $VAR / ${VAR} expansion; a variable the environment does not define is an error."""
    def sub(m):
        name = m.group(1) or m.group(2)
        assert name in env, f"${name} is used but not set"
        return env[name]

    return re.sub(r"\$\{(\w+)\}|\$([A-Za-z_]\w*)", sub, text)


def _mlflow_server_argv(script: str) -> list[str]:
    """The argv of the `mlflow server` command in a shell script (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", script)
    m = re.search(r"mlflow server ([^\n&>]*)", text)
    assert m, script
    return shlex.split(m.group(1))


def _check_mlflow_server(argv: list[str], env: dict[str, str]) -> list[str]:
    """The command parses with the installed MLflow's `mlflow server`; basic auth on, a PostgreSQL store, artifacts
    proxied to object storage. Returns the allowed Host headers."""
    from mlflow.cli import server as server_cmd

    params = server_cmd.make_context("mlflow server", list(argv)).params
    assert params["app_name"] == "basic-auth"
    store = _expand(params["backend_store_uri"], env)
    assert urlsplit(store).scheme in ("postgresql", "postgresql+psycopg"), store
    artifacts = _expand(params["artifacts_destination"], env)
    assert artifacts.startswith("s3://") and params["default_artifact_root"] is None, artifacts
    assert params["serve_artifacts"] and not params["artifacts_only"]
    return params["allowed_hosts"].split(",")


def _check_auth_ini(text: str) -> configparser.ConfigParser:
    ini = configparser.ConfigParser()
    ini.read_string(text)
    assert AUTH_INI_KEYS <= set(ini["mlflow"]), set(ini["mlflow"])
    module, func = ini["mlflow"]["authorization_function"].split(":")
    assert hasattr(importlib.import_module(module), func)
    assert urlsplit(ini["mlflow"]["database_uri"]).scheme.startswith("postgresql")
    return ini


def _ignored(gitignore: Path, name: str) -> bool:
    patterns = [p.strip() for p in gitignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def test_every_file_parses():
    files = _all_yaml()
    names = {str(p.relative_to(CLUSTER)) for p in files}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob-sweep.yaml", "kuberay/mlflow.yaml", "kuberay/postgres.yaml",
            "kuberay/config.yaml", "kuberay/kustomization.yaml", "launcher/aws.yaml"} <= names
    for p in files:
        assert _yaml_docs(p), p
    kinds = {d["kind"] for p in KUBERAY.glob("*.yaml") for d in _yaml_docs(p)}
    assert kinds == {"RayCluster", "RayJob", "Deployment", "StatefulSet", "Service", "ConfigMap", "Kustomization"}
    kust = _manifest("kustomization.yaml")
    for res in kust["resources"]:
        assert (KUBERAY / res).is_file(), res
    assert "rayjob-sweep.yaml" not in kust["resources"]  # one Ray cluster at a time (README: swap them)
    assert (CLUSTER / "README.md").is_file() and (CLUSTER / "Dockerfile.dockerignore").is_file()


def test_secret_values_are_never_committed():
    kust = _manifest("kustomization.yaml")
    # the RayCluster's pod templates name the Secrets, and kustomize does not rewrite names inside custom resources
    assert kust["generatorOptions"]["disableNameSuffixHash"] is True
    dockerignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    for gen in kust["secretGenerator"]:
        assert "literals" not in gen and "files" not in gen, gen["name"]  # values only in the env files
        for env in gen["envs"]:
            real = KUBERAY / env
            assert (KUBERAY / f"{env}.example").is_file(), env
            assert _ignored(real.parent / ".gitignore", real.name), f"{env} is not git-ignored"
            assert not _ignored(real.parent / ".gitignore", f"{real.name}.example")
            assert any(fnmatch.fnmatch(str(real.relative_to(ROOT)), p) for p in dockerignore), env
    assert not _docs_of_kind("Secret")  # no Secret manifest with values in it
    assert _ignored(LAUNCHER / ".gitignore", "stylegan.env")
    assert any(fnmatch.fnmatch("cluster/launcher/stylegan.env", p) for p in dockerignore)
    # the examples hold example values only: each secret value says to replace it
    examples = [*(KUBERAY / "secrets").glob("*.env.example"), LAUNCHER / "stylegan.env.example"]
    for path in examples:
        for key, value in _env_file(path).items():
            if re.search(r"PASSWORD|SECRET|_URI$", key):
                assert "replace" in value, f"{path.name}: {key}"


def test_dockerfile_builds_our_dependencies_on_cuda_torch():
    text = _dockerfile()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "cuda" in base
    m = re.match(r"pytorch/pytorch:(\d+)\.(\d+)", base)
    assert (int(m.group(1)), int(m.group(2))) >= (2, 4)  # pyproject: torch>=2.4, so pip keeps the base's CUDA torch
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    # the versions CI tests with, inside the ranges pyproject.toml accepts
    assert _pin("ray") == importlib.metadata.version("ray")
    assert _pin("mlflow") == importlib.metadata.version("mlflow")
    assert '"ray[train,tune,default]>=' in _pyproject() and '"ray[train,tune,default]==' in text
    # the server's basic-auth app and PostgreSQL driver, and S3 for its artifacts
    assert '"mlflow[auth]==' in text and '"psycopg[binary]' in text and '"boto3' in text
    # the package and everything the entry points read are in the image
    for src in ("pyproject.toml", "stylegan_dist", "data_pipeline", "sweeps", "configs"):
        assert re.search(rf"^COPY {src}\b", text, re.M), src
    assert re.search(r"^WORKDIR /app$", text, re.M) and "pip install ." in text
    assert "wget" in text  # KubeRay's probes
    assert "/shared" not in text  # no shared disk: the cluster sets the storage locations
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", "data", ".git"} <= set(ignored)


def test_one_image_everywhere():
    image = _image()
    containers = [c for p in KUBERAY.glob("*.yaml") for d in _yaml_docs(p) for c in _containers(d)]
    ours = [c["image"] for c in containers if c["name"] != "postgres"]
    assert len(ours) == 5 and set(ours) == {image}  # head + worker in RayCluster and RayJob, MLflow
    (postgres,) = [c for c in containers if c["name"] == "postgres"]
    assert re.fullmatch(r"postgres:\d+", postgres["image"])  # a pinned major version: its data format
    launcher = _yaml_docs(LAUNCHER / "aws.yaml")[0]
    assert launcher["docker"]["image"] == image
    kust = _manifest("kustomization.yaml")["images"]
    assert [(i["name"], i["newTag"]) for i in kust] == [tuple(image.split(":"))]
    readme = (CLUSTER / "README.md").read_text()
    assert f"docker build -f cluster/Dockerfile -t {image} ." in readme
    assert f"-t {image} ." in _dockerfile()


def test_raycluster_and_rayjob_agree():
    rc, rj = _manifest("raycluster.yaml"), _manifest("rayjob-sweep.yaml")
    assert rc["apiVersion"] == rj["apiVersion"] == "ray.io/v1"
    assert rc["spec"] == rj["spec"]["rayClusterSpec"], "the RayJob must bring the same cluster as raycluster.yaml"
    assert rc["spec"]["rayVersion"] == _pin("ray")
    assert rc["spec"]["authOptions"] == {"mode": "token"}  # KubeRay >= 1.5.1 makes the token Secret
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for group in rc["spec"]["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        gpus = c["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == c["resources"]["requests"]["nvidia.com/gpu"] == group["rayStartParams"]["num-gpus"]
        assert c["resources"]["limits"]["cpu"] == group["rayStartParams"]["num-cpus"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["minReplicas"] >= 1
        assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert mounts == {"/dev/shm"}
        (dshm,) = group["template"]["spec"]["volumes"]
        assert dshm["emptyDir"]["medium"] == "Memory"


def test_no_shared_volume():
    """Object storage replaces the ReadWriteMany volume: only PostgreSQL has a disk, its own ReadWriteOnce one."""
    assert not _docs_of_kind("PersistentVolumeClaim")
    for p in KUBERAY.glob("*.yaml"):
        assert "persistentVolumeClaim" not in p.read_text(), p.name
    (sts,) = _docs_of_kind("StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert claim["metadata"]["name"] in {m["name"] for m in c["volumeMounts"]}
    for path in [*KUBERAY.glob("*.yaml"), LAUNCHER / "aws.yaml", LAUNCHER / "stylegan.env.example"]:
        assert "/shared" not in path.read_text(), path.name


def test_ray_pods_get_storage_tracking_and_credentials():
    service = _one("Service", "mlflow")
    port = service["spec"]["ports"][0]["port"]
    deploy = _one("Deployment", "mlflow")
    (server,) = deploy["spec"]["template"]["spec"]["containers"]
    allowed = _check_mlflow_server(_mlflow_server_argv(server["args"][0]), _resolved_env(server))
    from mlflow.server.security_utils import is_allowed_host_header

    for name in ("raycluster.yaml", "rayjob-sweep.yaml"):
        containers = _containers(_manifest(name))
        assert {c["name"] for c in containers} == {"ray-head", "ray-worker"}
        for c in containers:
            env = _resolved_env(c)
            missing = set(POD_ENV) - set(env)
            assert not missing, f"{name} {c['name']}: {missing}"
            host = env["MLFLOW_TRACKING_URI"].split("//", 1)[1]
            assert host == f"{service['metadata']['name']}:{port}", env["MLFLOW_TRACKING_URI"]
            assert is_allowed_host_header(allowed, host)  # the server accepts the pods' Host header
            for key in BUCKET_ENV:
                assert env[key].startswith("s3://"), (key, env[key])
            assert "AWS_REGION" in env
            aws = [s["secretRef"] for s in c["envFrom"] if "secretRef" in s]
            assert aws and all(s.get("optional") for s in aws)  # empty with IRSA / Workload Identity
            # the token comes from authOptions; a literal one here would be a committed secret
            assert "RAY_AUTH_TOKEN" not in env
    assert is_allowed_host_header(allowed, f"localhost:{port}")  # kubectl port-forward


def test_mlflow_server_basic_auth_postgres_and_s3():
    deploy, service = _yaml_docs(KUBERAY / "mlflow.yaml")
    (server,) = deploy["spec"]["template"]["spec"]["containers"]
    assert server["command"] == ["bash", "-c"]
    script = server["args"][0]
    env = _resolved_env(server)
    argv = _mlflow_server_argv(script)
    _check_mlflow_server(argv, env)
    port = service["spec"]["ports"][0]["port"]
    assert argv[argv.index("--port") + 1] == str(port) == str(server["ports"][0]["containerPort"])
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert service["spec"]["selector"] == deploy["spec"]["template"]["metadata"]["labels"]
    # the auth ini, written at start from the Secret, is the one the server reads
    m = re.search(r'cat > "?\$MLFLOW_AUTH_CONFIG_PATH"? <<EOF\n(.*?)\nEOF\n', script, re.S)
    assert m, "the auth ini is written to $MLFLOW_AUTH_CONFIG_PATH"
    ini = _check_auth_ini(_expand(m.group(1), env))
    assert env["MLFLOW_AUTH_CONFIG_PATH"].startswith("/tmp/")  # writable in the container
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in env  # the same for every worker
    # the server's admin is the user the Ray pods log in as
    secrets = _secrets()["stylegan-mlflow"]
    assert ini["mlflow"]["admin_username"] == secrets["MLFLOW_TRACKING_USERNAME"]
    assert ini["mlflow"]["admin_password"] == secrets["MLFLOW_TRACKING_PASSWORD"]
    assert deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/health"


def test_postgres_serves_both_mlflow_databases():
    sts = _one("StatefulSet", "postgres")
    service = _one("Service", "postgres")
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == sts["spec"]["template"]["metadata"]["labels"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    pg = _resolved_env(c)
    assert {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"} <= set(pg)
    # the init script makes the auth database beside POSTGRES_DB
    init = _configmaps()["postgres-init"]
    (script,) = init.values()
    created = re.search(r'CREATE DATABASE \\?"?(\$\{\w+\}\w*|\w+)', script)
    assert created, script
    auth_db = _expand(created.group(1), pg)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    vol = volumes[mounts["/docker-entrypoint-initdb.d"]]
    assert vol["configMap"]["name"] == "postgres-init"
    assert pg["PGDATA"].startswith([m for m in mounts if mounts[m] == "data"][0] + "/")
    # the MLflow Secret's URIs point at this database with its credentials
    mlflow = _secrets()["stylegan-mlflow"]
    port = service["spec"]["ports"][0]["port"]
    for key, db in (("MLFLOW_BACKEND_STORE_URI", pg["POSTGRES_DB"]),
                    ("MLFLOW_AUTH_DATABASE_URI", auth_db)):
        u = urlsplit(mlflow[key])
        assert (u.scheme, u.hostname, u.port, u.path) == ("postgresql", "postgres", port, f"/{db}"), key
        assert (u.username, u.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"]), key


def _entry_argv(command: str, module: str = "stylegan_dist.sweep") -> list[str]:
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", module], command
    return argv[3:]


def _check_sweep_command(argv: list[str], gpus_per_node: int, cpus_per_node: float, nodes: int) -> None:
    """The sweep command parses with the real CLI, names a shipped sweep file (at /app in the image), reads its
    data from object storage, stores the sweep there (STYLEGAN_DIST_STORAGE when --storage is not given), and
    each trial fits one node of the GPU pool."""
    args = sweep.parse_args(argv)
    assert args.sweep.startswith("/app/sweeps/"), args.sweep
    local = ROOT / Path(args.sweep).relative_to("/app")
    assert local.is_file(), local
    spec = load_sweep(local, args.set_args)
    assert args.data.startswith("s3://") and (args.storage is None or args.storage.startswith("s3://"))
    r = spec.resources
    assert r.gpu in (True, "auto")
    assert r.workers <= gpus_per_node, "a trial's GPU workers fit one node"
    assert r.workers * r.cpus_per_worker + sweep.TRIAL_DRIVER_CPUS <= cpus_per_node
    use_gpu, concurrency = sweep.plan_resources(spec, {"GPU": gpus_per_node * nodes, "CPU": cpus_per_node * nodes})
    assert use_gpu and concurrency == min(nodes, spec.num_trials())


def test_rayjob_entrypoint_matches_the_code():
    rj = _manifest("rayjob-sweep.yaml")
    assert importlib.util.find_spec("stylegan_dist.sweep") is not None
    group = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    (c,) = group["template"]["spec"]["containers"]
    _check_sweep_command(_entry_argv(rj["spec"]["entrypoint"]), int(c["resources"]["limits"]["nvidia.com/gpu"]),
                         float(c["resources"]["limits"]["cpu"]), group["replicas"])


def test_launcher_resources_match_instances_and_sweeps():
    cfg = _yaml_docs(LAUNCHER / "aws.yaml")[0]
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    gpu_nodes = []
    for name, node in cfg["available_node_types"].items():
        itype = node["node_config"]["InstanceType"]
        gpus, vcpus = INSTANCES[itype]
        res = node["resources"]
        assert res.get("GPU", 0) == gpus, (name, itype)
        assert res["CPU"] <= vcpus, (name, itype)
        if gpus:
            gpu_nodes.append((res["GPU"], res["CPU"], node["min_workers"]))
            # workers write checkpoints to S3: they need an instance profile (Ray gives one only to the head)
            assert "IamInstanceProfile" in node["node_config"], name
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    (gpus, cpus, min_workers), = gpu_nodes
    assert min_workers >= 1  # the sweep plans with the GPUs present when it starts
    for name in SWEEPS:
        _check_sweep_command([f"/app/sweeps/{name}.yaml", "--data", "s3://BUCKET/data/ffhq1024"], gpus, cpus, 1)


def _ray_starts(commands: list[str]) -> list[str]:
    return [c for c in commands if re.search(r"\bray start\b", c)]


def test_launcher_token_auth_env_and_mlflow():
    cfg = _yaml_docs(LAUNCHER / "aws.yaml")[0]
    head_cmds, worker_cmds = cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]
    # token authentication on every node, with the token file generated locally and copied to each node
    mounts = cfg["file_mounts"]
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"
    for cmds in (head_cmds, worker_cmds):
        (start,) = _ray_starts(cmds)
        assert re.search(r"(^|\s|&&\s*|export\s+)RAY_AUTH_MODE=token\s", start), start
    (head_start,) = _ray_starts(head_cmds)
    (worker_start,) = _ray_starts(worker_cmds)
    assert "--num-cpus=0" in head_start and "--dashboard-host=0.0.0.0" in head_start
    assert "--port=6379" in head_start and "$RAY_HEAD_IP:6379" in worker_start
    # the settings file: a git-ignored copy of the committed example, read on every node before `ray start`
    (remote, local), = [(r, p) for r, p in mounts.items() if p.endswith(".env")]
    assert (ROOT / f"{local}.example").is_file() and _ignored((ROOT / local).parent / ".gitignore", Path(local).name)
    example = _env_file(ROOT / f"{local}.example")
    for start in (head_start, worker_start):
        assert f". {remote}" in start and "set -a" in start, start
        env = dict(example, MLFLOW_TRACKING_URI="http://HEAD:5000") if "MLFLOW_TRACKING_URI=http://" in start else {}
        missing = set(POD_ENV) - set(env)
        assert not missing, missing
        for key in BUCKET_ENV:
            assert env[key].startswith("s3://"), key
    # the MLflow server on the head: basic auth, PostgreSQL, S3 artifacts, an auth ini from the settings file
    (server,) = [c for c in head_cmds if "mlflow server" in c]
    assert f". {remote}" in server
    env = dict(example, HOME="/root")
    allowed = _check_mlflow_server(_mlflow_server_argv(server), env)
    from mlflow.server.security_utils import is_allowed_host_header

    assert is_allowed_host_header(allowed, "10.0.1.17:5000")  # workers reach it at the head's private address
    ini_path = re.search(r"MLFLOW_AUTH_CONFIG_PATH=(\S+)", server).group(1)
    fmt, *values = shlex.split(re.search(r"printf ('[^']*'(?: \"[^\"]*\")+) > " + re.escape(ini_path), server).group(1))
    ini = _check_auth_ini(fmt.replace("\\n", "\n") % tuple(_expand(v, env) for v in values))
    assert ini["mlflow"]["admin_username"] == example["MLFLOW_TRACKING_USERNAME"]
    assert {"MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_DATABASE_URI"} <= set(example)
    # no EFS: nothing mounts a network filesystem
    text = (LAUNCHER / "aws.yaml").read_text()
    assert "nfs4" not in text and "efs" not in text.lower()


def _commands(text: str) -> list[str]:
    """`python -m MODULE ...` commands in a text (README code blocks, manifests), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    return re.findall(r"python -m ([A-Za-z_][\w.]*)([^\n`\"]*)", text)


@pytest.mark.parametrize("path", ["README.md", "cluster/README.md", "sweeps/README.md",
                                  "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob-sweep.yaml"])
def test_documented_commands_exist(path):
    text = (ROOT / path).read_text()
    cmds = _commands(text)
    assert cmds, path
    for module, rest in cmds:
        assert importlib.util.find_spec(module) is not None, f"{path}: python -m {module}"
        argv = shlex.split(rest.split("|")[0].split("&&")[0].split("#")[0])
        if module == "stylegan_dist.sweep":
            args = sweep.parse_args(argv)
            swept = Path(args.sweep.removeprefix("/app/"))
            assert (ROOT / swept).is_file(), f"{path}: {args.sweep}"
        elif module == "stylegan_dist.train":
            args = train.parse_args(argv)
            assert args.data, f"{path}: python -m stylegan_dist.train{rest}"
    for ref in re.findall(r"(?<![\w/])((?:cluster|sweeps)/[\w./-]+\.(?:yaml|md|example))", text):
        if Path(ref).stem.isupper():  # a template name such as sweeps/NAME.yaml
            continue
        assert (ROOT / ref).is_file(), f"{path} mentions {ref}"


def test_readme_submits_with_the_token_and_object_storage():
    text = re.sub(r"\\\n\s*", " ", (CLUSTER / "README.md").read_text())
    rc = _manifest("raycluster.yaml")
    # the token is read out of the Secret KubeRay makes for the RayCluster (named after it, key auth_token)
    assert f"kubectl get secret {rc['metadata']['name']} -o jsonpath='{{.data.auth_token}}' | base64 -d" in text
    assert "export RAY_AUTH_MODE=token" in text and "ray get-auth-token --generate" in text
    submits = re.findall(r"ray job submit [^\n]*", text)
    assert submits
    for cmd in submits:
        for module, rest in _commands(cmd):
            argv = shlex.split(rest)
            data = (sweep if module == "stylegan_dist.sweep" else train).parse_args(argv).data
            assert data is None or data.startswith("s3://"), cmd
    for env in _manifest("kustomization.yaml")["secretGenerator"][0]["envs"] + ["secrets/postgres.env"]:
        assert f"cp {Path(env).name}.example {Path(env).name}" in text, env
    assert "aws s3 cp --recursive" in text and "tests/test_on_cluster.py" in text
