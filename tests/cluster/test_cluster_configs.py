"""The cluster configs parse and carry what Ray's cluster launcher and KubeRay require, and keep
the security settings: token auth on, the launcher's dashboard on 127.0.0.1, no credential in any
file, checkpoints on shared storage."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from ._head import REPO

CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
DOCS = REPO / "docs" / "cluster.md"
SHARED = "/mnt/shared"
_HEX_TOKEN = re.compile(r"\b[0-9a-f]{32,}\b")  # what `ray get-auth-token --generate` makes
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    return {p.name: _load_all(p) for p in sorted(KUBERAY.glob("*.yaml"))}


def _one(manifests, kind: str) -> dict:
    found = [d for docs in manifests.values() for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# ----------------------------------------------------------------------------- no secrets anywhere
@pytest.mark.parametrize(
    "path",
    [CLUSTER / "aws-gpu.yaml", CLUSTER / "Dockerfile", *sorted(KUBERAY.glob("*.yaml"))],
    ids=lambda p: p.name,
)
def test_no_credential_is_written_in_a_cluster_file(path):
    text = path.read_text()
    assert not _HEX_TOKEN.search(text), "something that looks like a token"
    assert not re.search(r'RAY_AUTH_TOKEN=(?!"?\$)\S', text), "a literal token value"
    for doc in _load_all(path) if path.suffix == ".yaml" else []:
        assert doc.get("kind") != "Secret", "Secrets are created by the user, not kept in the repo"


# ----------------------------------------------------------------------------- cluster launcher
def test_launcher_yaml_passes_rays_own_validation(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))  # ray-schema.json and Ray's checks


def test_launcher_node_types_cpu_head_gpu_training_cpu_data(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {k: v for k, v in types.items() if k != launcher["head_node_type"]}
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    cpu = [
        v
        for v in workers.values()
        if not v["resources"].get("GPU") and v["resources"].get("CPU", 0) >= 1
    ]
    assert gpu and cpu
    for t in workers.values():  # autoscaling: a range, not a fixed size
        assert 0 <= t["min_workers"] < t["max_workers"] <= launcher["max_workers"]
    assert gpu[0]["min_workers"] == 0  # GPUs only while there is training to do


def test_launcher_keeps_token_auth_on_and_the_dashboard_on_loopback(launcher):
    run_options = " ".join(launcher["docker"]["run_options"])
    assert "-e RAY_AUTH_MODE=token" in run_options
    head_start = " ".join(launcher["head_start_ray_commands"])
    ray_start = next(c for c in launcher["head_start_ray_commands"] if "ray start --head" in c)
    assert "RAY_AUTH_MODE=token" in ray_start and "--dashboard-host=127.0.0.1" in ray_start
    assert "--dashboard-host=0.0.0.0" not in head_start
    assert "--num-cpus=0" in ray_start
    worker_start = next(c for c in launcher["worker_start_ray_commands"] if "ray start" in c)
    assert "RAY_AUTH_MODE=token" in worker_start and "$RAY_HEAD_IP" in worker_start
    # the token reaches the nodes as a file from the user's machine, never as a literal
    assert launcher["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_launcher_runs_the_project_image_with_shared_storage(launcher, manifests):
    image = launcher["docker"]["image"]
    assert image.endswith(":0.1.0") and "tensormask-ray" in image
    assert f"-v {SHARED}:{SHARED}" in launcher["docker"]["run_options"]
    init = " ".join(launcher["initialization_commands"])
    assert "mount -t nfs4" in init and SHARED in init
    ray_cluster = _one(manifests, "RayCluster")
    assert (
        ray_cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == image
    )


# ----------------------------------------------------------------------------- KubeRay
def _check_group_template(template: dict, where: str, claim: str) -> dict:
    spec = template["spec"]
    containers = spec["containers"]
    assert containers, f"{where}: at least one container"
    c = containers[0]
    assert c.get("name") and c.get("image"), f"{where}: container needs name and image"
    res = c["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind]), f"{where}: resources.{kind} cpu and memory"
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
    assert SHARED in mounts, f"{where}: mounts the shared claim at {SHARED}"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == claim
    return c


def _check_ray_cluster_spec(spec: dict, claim: str) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__  # the image's Ray is the client's Ray
    auth = spec["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"], (
        "token auth, from a Secret the user makes"
    )
    head = spec["headGroupSpec"]
    params = head["rayStartParams"]
    assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), (
        "rayStartParams values must be strings"
    )
    assert params.get("num-cpus") == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "never expose the head outside"
    c = _check_group_template(head["template"], "head", claim)
    assert {p["containerPort"] for p in c["ports"]} >= {6379, 8265, 10001}
    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names) and all(_DNS_LABEL.match(n) for n in names)
    gpu_groups = []
    for g in groups:
        assert isinstance(g["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        for key in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(g[key], int), f"{g['groupName']}.{key}"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        c = _check_group_template(g["template"], g["groupName"], claim)
        if "nvidia.com/gpu" in c["resources"]["limits"]:
            gpu_groups.append(g)
    assert gpu_groups and len(gpu_groups) < len(groups), "GPU workers for training, CPU for data"
    assert spec.get("enableInTreeAutoscaling") is True


def test_every_manifest_is_a_named_kubernetes_object(manifests):
    assert {"raycluster.yaml", "rayjob-sweep.yaml", "storage.yaml", "mlflow.yaml"} <= set(manifests)
    for name, docs in manifests.items():
        for d in docs:
            assert d.get("apiVersion") and d.get("kind"), name
            assert _DNS_LABEL.match(d["metadata"]["name"]), (name, d["metadata"]["name"])


def test_raycluster_carries_what_kuberay_requires(manifests):
    rc = _one(manifests, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    claim = _one(manifests, "PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    _check_ray_cluster_spec(rc["spec"], claim["metadata"]["name"])


def test_rayjob_runs_a_sweep_on_its_own_cluster_and_cleans_up(manifests):
    job = _one(manifests, "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("tensormask-ray sweep ")
    claim = _one(manifests, "PersistentVolumeClaim")["metadata"]["name"]
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
    _check_ray_cluster_spec(spec["rayClusterSpec"], claim)
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    assert spec["backoffLimit"] >= 0 and spec["activeDeadlineSeconds"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    env_vars = runtime_env["env_vars"]
    assert env_vars["MLFLOW_TRACKING_URI"].startswith("http://")
    assert not [k for k in env_vars if re.search("TOKEN|SECRET|PASSW|KEY", k)]
    # the spec file named by the entrypoint is mounted on the head, where the driver runs
    spec_path = spec["entrypoint"].split()[2]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    mount_dir = str(Path(spec_path).parent)
    assert mount_dir in mounts
    volume = next(v for v in head["volumes"] if v["name"] == mounts[mount_dir])
    assert Path(spec_path).name in {i["path"] for i in volume["configMap"]["items"]}


def test_mlflow_server_is_internal_and_is_what_the_jobs_use(manifests):
    svc = _one(manifests, "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    port = svc["spec"]["ports"][0]["port"]
    uri = f"http://{svc['metadata']['name']}:{port}"
    rc = _one(manifests, "RayCluster")["spec"]
    containers = [rc["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in rc["workerGroupSpecs"]
    ]
    for c in containers:
        assert {"name": "MLFLOW_TRACKING_URI", "value": uri} in c["env"]
    job_env = yaml.safe_load(_one(manifests, "RayJob")["spec"]["runtimeEnvYAML"])["env_vars"]
    assert job_env["MLFLOW_TRACKING_URI"] == uri
    deploy = _one(manifests, "Deployment")
    args = " ".join(deploy["spec"]["template"]["spec"]["containers"][0]["args"])
    assert f"sqlite:///{SHARED}/" in args and "--artifacts-destination" in args


# ----------------------------------------------------------------------------- Dockerfile
def test_dockerfile_builds_the_kernels_against_cuda_torch_for_common_gpus():
    text = (CLUSTER / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) == 2 and "cuda" in froms[0] and "devel" in froms[0] and "runtime" in froms[1]
    arch = re.search(r'TORCH_CUDA_ARCH_LIST="([^"]+)"', text).group(1)
    assert {"7.0", "8.0", "8.6", "8.9", "9.0"} <= {a.replace("+PTX", "") for a in arch.split(";")}
    assert re.search(r"--index-url \$\{TORCH_INDEX_URL\} torch==", text)
    assert "download.pytorch.org/whl/cu" in text
    assert "--no-build-isolation" in text and "CUDA_HOME=/usr/local/cuda" in text
    assert "COPY csrc" in text and "COPY tensormask_ray" in text
    assert (
        'python -c "import tensormask_ray._C"' in text
    )  # the image fails to build without kernels
    lines = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [x.strip() for x in lines if x.strip() and not x.startswith("#")]
    assert rules[0] == "**", "the context holds nothing but what is let back in"
    assert {"!csrc/**", "!tensormask_ray/**", "tensormask_ray/**/*.so"} <= set(rules)


# ----------------------------------------------------------------------------- docs
def test_cluster_docs_walk_from_cluster_start_to_a_sweep_in_mlflow():
    text = DOCS.read_text()
    for needle in (
        "ray up cluster/aws-gpu.yaml",
        "ray dashboard cluster/aws-gpu.yaml",
        "kubectl apply -f cluster/kuberay/",
        "kubectl port-forward",
        "tensormask-ray submit sweep",
        "tensormask-ray jobs logs",
        "RAY_AUTH_TOKEN",
        "--token-file",
        "--ship-code",
        "mlflow",
        "ray down cluster/aws-gpu.yaml",
    ):
        assert needle in text, needle
    for ref in re.findall(r"cluster/[\w./-]+\.(?:yaml|md)|cluster/Dockerfile", text):
        assert (REPO / ref).exists(), ref
