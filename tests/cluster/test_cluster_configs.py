"""The cluster configs parse and carry what Ray's cluster launcher and KubeRay require, and keep
the security settings: token auth on, the launcher's dashboard on 127.0.0.1, no credential in any
file, checkpoints on shared storage."""

from __future__ import annotations

import copy
import re
import shlex
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
def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{path}: a continued last line"
    return out


def _stages(path: Path) -> tuple[dict[str, str], list[dict]]:
    """(global ARG defaults, stages): each stage {"image", "name", "args", "run", "copy", "env"},
    its FROM image with the ARGs declared before it substituted."""
    args: dict[str, str] = {}
    stages: list[dict] = []
    for word, rest in _instructions(path):
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image.strip())
            stages.append({"image": image, "name": name.strip(), "args": {}, "run": [], "copy": []})
        elif word == "ARG":
            key, _, value = rest.partition("=")
            (stages[-1]["args"] if stages else args)[key] = value.strip('"')
        elif word in ("RUN", "COPY"):
            stages[-1][word.lower()].append(rest)
    return args, stages


def _context_includes(rules: list[str], path: str) -> bool:
    """Whether a .dockerignore (its rules, in order) lets `path` into the build context: the last
    rule matching the path or a folder above it decides; `!` lets back in."""

    def regex(pattern: str) -> re.Pattern:
        parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
        # as Docker's matcher: `**/` is any number of folders, none included
        wild = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        return re.compile("".join(wild.get(x, re.escape(x)) for x in parts) + "$")

    prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    included = True
    for rule in rules:
        negated = rule.startswith("!")
        if any(regex(rule.lstrip("!")).match(p) for p in prefixes):
            included = negated
    return included


def test_dockerfile_stages_match_each_other_and_torch_matches_the_cuda_base():
    args, (build, runtime) = _stages(CLUSTER / "Dockerfile")
    # the runtime image is the build image's CUDA, cuDNN and OS without the toolkit
    assert (
        "-devel-" in build["image"]
        and build["image"].replace("-devel-", "-runtime-") == (runtime["image"])
    )
    assert any(c.startswith(f"--from={build['name']} /opt/venv") for c in runtime["copy"])
    # torch comes from the index of the base image's CUDA (12.8.1 -> cu128)
    major, minor = args["CUDA_VERSION"].split(".")[:2]
    assert build["args"]["TORCH_INDEX_URL"].endswith(f"/whl/cu{major}{minor}")
    # and torchvision is the release paired with that torch (2.4 <-> 0.19, ..., 2.14 <-> 0.29)
    torch_minor = int(build["args"]["TORCH_VERSION"].split(".")[1])
    assert build["args"]["TORCHVISION_VERSION"].startswith(f"0.{torch_minor + 15}.")
    arches = {a.removesuffix("+PTX") for a in build["args"]["TORCH_CUDA_ARCH_LIST"].split(";")}
    assert {"8.0", "8.6", "8.9", "9.0"} <= arches
    assert int(major) < 13 or "7.0" not in arches, "CUDA 13 does not compile for sm_70"


def test_dockerfile_compiles_the_kernels_against_the_torch_it_installed_first():
    _, (build, _) = _stages(CLUSTER / "Dockerfile")
    runs = [[shlex.split(cmd) for cmd in run.split("&&")] for run in build["run"]]
    commands = [(i, c) for i, run in enumerate(runs) for c in run]

    def first(pred) -> tuple[int, list[str]]:
        found = [(i, c) for i, c in commands if pred(c)]
        assert found, "no such command in the build stage"
        return found[0]

    torch_at, torch_cmd = first(
        lambda c: c[:2] == ["pip", "install"] and "torch==${TORCH_VERSION}" in c
    )
    assert torch_cmd[torch_cmd.index("--index-url") + 1] == "${TORCH_INDEX_URL}"
    wheel_at, wheel_cmd = first(lambda c: "pip" in c and c[c.index("pip") + 1] == "wheel")
    assert wheel_at > torch_at and "--no-build-isolation" in wheel_cmd
    env = dict(tok.split("=", 1) for tok in wheel_cmd[: wheel_cmd.index("pip")])
    assert env["CUDA_HOME"] == "/usr/local/cuda"
    assert env["TORCH_CUDA_ARCH_LIST"] == "${TORCH_CUDA_ARCH_LIST}"
    # the image fails to build without kernels: the import runs in the same RUN, after the wheel
    check_at, _ = first(lambda c: c[:2] == ["python", "-c"] and "import tensormask_ray._C" in c[2])
    assert check_at == wheel_at


def test_the_build_context_holds_every_source_copied_and_no_compiled_extension():
    _, (build, _) = _stages(CLUSTER / "Dockerfile")
    lines = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [x.strip() for x in lines if x.strip() and not x.startswith("#")]
    sources = [src for c in build["copy"] for src in c.split()[:-1] if not src.startswith("--")]
    assert {"pyproject.toml", "setup.py", "csrc", "tensormask_ray"} <= set(sources)
    for src in sources:
        path = REPO / src
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        files = [
            f for f in files if "__pycache__" not in f.parts and f.suffix not in (".so", ".pyc")
        ]
        assert files, f"COPY {src}: nothing in the repository"
        left_out = [
            f for f in files if not _context_includes(rules, f.relative_to(REPO).as_posix())
        ]
        assert not left_out, f"COPY {src}: the dockerignore leaves out {left_out[:5]}"
    # a local build's extension (another torch's ABI) and data never go into the image
    for path in (
        "tensormask_ray/_C.cpython-311-x86_64-linux-gnu.so",
        "tensormask_ray/ops/__pycache__/api.pyc",
        "data/x.parquet",
        ".git/HEAD",
        ".venv/bin/python",
    ):
        assert not _context_includes(rules, path), path


# ----------------------------------------------------------------------------- docs
def _documented_commands(text: str) -> list[list[str]]:
    """Every `tensormask-ray ...` line of the bash code blocks and every inline `tensormask-ray
    ...` span (usage synopses and elided ones aside), continuation lines joined and the trailing
    comment dropped, as argv (without the program name)."""
    lines = [
        line
        for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", text, re.M | re.S)
        for line in re.sub(r"\\\n\s*", " ", block).splitlines()
    ]
    lines += re.findall(r"`(tensormask-ray [^`]+)`", text)
    commands = []
    for line in lines:
        # usage synopses ([OPTIONS], {a|b}, a | b) and elisions (...) are not command lines
        synopsis = re.search(r"\[-|\[[A-Z]|\{|\s\|\s|\.\.\.", line)
        argv = shlex.split(line, comments=True)[1:] if line.startswith("tensormask-ray ") else []
        if len(argv) >= 2 and not synopsis:  # one word: the command's name in prose
            commands.append(argv)
    return commands


def _parse(argv: list[str]) -> None:
    """Parses a command line as `tensormask-ray` would (for `submit`, its own options, then the
    command's with that command's parser), without running anything."""
    from tensormask_ray import cli
    from tensormask_ray.cluster import check
    from tensormask_ray.cluster.cli import split_args

    args = cli.build_parser(argv[0]).parse_args(argv)
    if argv[0] != "submit":
        return
    own, rest = split_args(list(args.job_args))
    cli.build_parser("submit").parse_args(["submit", args.job_command, *own])
    if args.job_command == "check":
        check.build_parser().parse_args(rest)
    else:
        cli.build_parser(args.job_command).parse_args([args.job_command, *rest])


def test_every_command_the_cluster_docs_show_parses():
    commands = _documented_commands(DOCS.read_text())
    shown = {tuple(c[:2]) for c in commands}
    # the walk-through: check, sweep, and every jobs subcommand
    assert {("submit", "check"), ("submit", "sweep")} <= shown
    assert {("jobs", "list"), ("jobs", "logs"), ("jobs", "status"), ("jobs", "stop")} <= shown
    for argv in commands:
        try:
            _parse(argv)
        except SystemExit as e:  # 0: a --help line, which prints the help and exits
            if e.code != 0:
                pytest.fail(f"docs/cluster.md: `tensormask-ray {shlex.join(argv)}` does not parse")


def test_a_wrong_documented_command_would_not_parse():
    for argv in (
        ["submit", "sweep", "S.yaml", "--resume"],  # --resume needs a name
        ["submit", "check", "--storage"],  # not check's option
        ["jobs", "logs"],  # no job id
    ):
        with pytest.raises(SystemExit):
            _parse(argv)


def test_cluster_docs_name_files_that_exist():
    text = DOCS.read_text()
    refs = re.findall(r"cluster/[\w./-]+\.(?:yaml|md)|cluster/Dockerfile", text)
    assert refs
    for ref in refs:
        assert (REPO / ref).exists(), ref
