"""cluster/: every file parses, and the image, versions, entry points, paths and resources agree with each
other and with the code (no network, no Kubernetes, no cloud)."""

import importlib.metadata
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from stylegan_dist import sweep
from stylegan_dist.sweep_schema import load_sweep

CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
# GPUs and vCPUs of the instance types the launcher file may use
INSTANCES = {"p4d.24xlarge": (8, 96), "p4de.24xlarge": (8, 96), "p5.48xlarge": (8, 192), "g5.48xlarge": (8, 192),
             "g6e.48xlarge": (8, 192), "m6i.4xlarge": (0, 16), "m6i.2xlarge": (0, 8)}


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


def test_every_file_parses():
    files = _all_yaml()
    names = {str(p.relative_to(CLUSTER)) for p in files}
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob-sweep.yaml", "kuberay/mlflow.yaml", "kuberay/storage.yaml",
            "kuberay/kustomization.yaml", "launcher/aws.yaml"} <= names
    for p in files:
        assert _yaml_docs(p), p
    kinds = {d["kind"] for p in KUBERAY.glob("*.yaml") for d in _yaml_docs(p)}
    assert kinds == {"RayCluster", "RayJob", "Deployment", "Service", "PersistentVolumeClaim", "Kustomization"}
    kust = _manifest("kustomization.yaml")
    for res in kust["resources"]:
        assert (KUBERAY / res).is_file(), res
    assert (CLUSTER / "README.md").is_file() and (CLUSTER / "Dockerfile.dockerignore").is_file()


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
    # the package and everything the entry points read are in the image
    for src in ("pyproject.toml", "stylegan_dist", "data_pipeline", "sweeps", "configs"):
        assert re.search(rf"^COPY {src}\b", text, re.M), src
    assert re.search(r"^WORKDIR /app$", text, re.M) and "pip install ." in text
    assert "wget" in text  # KubeRay's probes
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", "runs", "data", ".git"} <= set(ignored)


def test_one_image_everywhere():
    image = _image()
    images = [c["image"] for p in KUBERAY.glob("*.yaml") for d in _yaml_docs(p) for c in _containers(d)]
    assert len(images) == 5 and set(images) == {image}  # head + worker in RayCluster and RayJob, MLflow
    launcher = _yaml_docs(CLUSTER / "launcher" / "aws.yaml")[0]
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
        assert {"/shared", "/dev/shm"} <= mounts


def _env(container: dict) -> dict:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_shared_volume_and_mlflow_wiring():
    pvc = _manifest("storage.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    deploy, service = _yaml_docs(KUBERAY / "mlflow.yaml")
    claims = set()
    for p in ("raycluster.yaml", "rayjob-sweep.yaml", "mlflow.yaml"):
        for d in _yaml_docs(KUBERAY / p):
            text = yaml.safe_dump(d)
            claims |= set(re.findall(r"claimName: (\S+)", text))
    assert claims == {pvc["metadata"]["name"]}
    port = service["spec"]["ports"][0]["port"]
    (server,) = deploy["spec"]["template"]["spec"]["containers"]
    args = shlex.split(" ".join(server["args"]))
    assert f"--port {port}" in " ".join(args) and server["ports"][0]["containerPort"] == port
    assert service["spec"]["selector"] == deploy["spec"]["template"]["metadata"]["labels"]
    # every mlflow server flag exists in the installed MLflow
    from mlflow.cli import server as server_cmd

    known = {o for p in server_cmd.params for o in p.opts}
    for flag in [a for a in args if a.startswith("--")]:
        assert flag in known, flag
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    from mlflow.server.security_utils import is_allowed_host_header

    for c in _containers(_manifest("raycluster.yaml")):
        uri = _env(c)["MLFLOW_TRACKING_URI"]
        host = uri.split("//", 1)[1]
        assert host == f"{service['metadata']['name']}:{port}", uri
        assert is_allowed_host_header(allowed, host)  # the server accepts the pods' Host header
        assert _env(c)["STYLEGAN_WEIGHTS_DIR"].startswith("/shared/")
    assert is_allowed_host_header(allowed, f"localhost:{port}")  # kubectl port-forward


def _entry_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "stylegan_dist.sweep"], command
    return argv[3:]


def _check_sweep_command(argv: list[str], gpus_per_node: int, cpus_per_node: float, nodes: int) -> None:
    """The sweep command parses with the real CLI, names a shipped sweep file (at /app in the image), keeps
    data and runs on the shared volume, and each trial fits one node of the GPU pool."""
    args = sweep.parse_args(argv)
    assert args.sweep.startswith("/app/sweeps/"), args.sweep
    local = ROOT / Path(args.sweep).relative_to("/app")
    assert local.is_file(), local
    spec = load_sweep(local, args.set_args)
    assert args.data.startswith("/shared/data/") and args.storage.startswith("/shared/")
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
    cfg = _yaml_docs(CLUSTER / "launcher" / "aws.yaml")[0]
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
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--num-cpus=0" in start and "--dashboard-host=0.0.0.0" in start and "MLFLOW_TRACKING_URI=" in start
    assert "--port=6379" in start and "$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])
    assert "/shared" in " ".join(cfg["initialization_commands"])
    assert "-v /shared:/shared" in cfg["docker"]["run_options"]
    (gpus, cpus, min_workers), = gpu_nodes
    assert min_workers >= 1  # the sweep plans with the GPUs present when it starts
    for name in ("table1_configs", "table2_mixing", "table3_path_length", "table4_mapping_depth", "noise_ablation"):
        _check_sweep_command([f"/app/sweeps/{name}.yaml", "--data", "/shared/data/ffhq1024", "--storage",
                              "/shared/runs"], gpus, cpus, 1)


def _commands(text: str) -> list[str]:
    """`python -m MODULE ...` commands in a text (README code blocks, manifests), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    return re.findall(r"python -m ([A-Za-z_][\w.]*)([^\n`\"]*)", text)


@pytest.mark.parametrize("path", ["cluster/README.md", "sweeps/README.md", "cluster/kuberay/raycluster.yaml",
                                  "cluster/kuberay/rayjob-sweep.yaml"])
def test_documented_commands_exist(path):
    text = (ROOT / path).read_text()
    cmds = _commands(text)
    assert cmds, path
    for module, rest in cmds:
        assert importlib.util.find_spec(module) is not None, f"{path}: python -m {module}"
        if module == "stylegan_dist.sweep":
            argv = shlex.split(rest.split("|")[0].split("&&")[0].split("#")[0])
            args = sweep.parse_args(argv)
            swept = Path(args.sweep.removeprefix("/app/"))
            assert (ROOT / swept).is_file(), f"{path}: {args.sweep}"
    for ref in re.findall(r"(?<![\w/])((?:cluster|sweeps)/[\w./-]+\.(?:yaml|md))", text):
        if Path(ref).stem.isupper():  # a template name such as sweeps/NAME.yaml
            continue
        assert (ROOT / ref).is_file(), f"{path} mentions {ref}"
