#!/usr/bin/env python
"""Render Kubernetes manifests for an ARFlow training job.

Two variants:
  pytorchjob  a Kubeflow PyTorchJob (training operator): one Master and NODES - 1 Workers with
              an elastic policy (c10d rendezvous on the master's service)
  job         for clusters without the operator: an Indexed Job plus a headless Service; pod 0
              is the rendezvous host

Every pod runs the image that the repository's Dockerfile builds (`--image`, default
$ARFLOW_IMAGE, else the placeholder registry.example.com/arflow:latest: push the image to your
registry and name it) as `torchrun ... -m arflow train --config CONFIG --resume auto`, as the
image's non-root user (uid 10001, `--uid`; fsGroup makes the PVC writable to it), with /dev/shm
as a memory volume (DataLoader workers), S3 credentials from a Secret, checkpoints on a PVC or
in S3, and a termination grace period long enough for the trainer to save after SIGTERM
(torchrun forwards the signal and waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds).

Elastic (--min-nodes below --nodes): torchrun runs with --nnodes=MIN:NODES and the PyTorchJob's
elasticPolicy says the same. A pod that dies does not end the job: torchrun restarts the workers
of the pods left at the smaller world size, from the newest committed checkpoint (resharded), and
the pod the operator (or the Job controller) starts in its place joins at the next round, which
restarts the workers at full size. Lost: the steps since the last committed checkpoint (at most
checkpoint.every; a save being written when the pod died is removed); a join costs a restart but
no steps (the workers save before they stop, within torchrun's 30 s). The rendezvous host (the
master, or pod 0) must survive: its loss restarts the whole job from the checkpoints. Every pod
sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torchrun's store shared across rounds, a pod
joining a running job, or rank 0 moving to another pod, fails every restart.

Example:
  python launchers/k8s/render.py --name xl256 --nodes 4 --gpus-per-node 8 \\
      --image registry.example.com/arflow:latest --config xl_256 \\
      --checkpoint-dir s3://my-bucket/arflow/xl256 --s3-secret arflow-s3 | kubectl apply -f -
"""

from __future__ import annotations

import argparse
import os
import re
import sys

RDZV_PORT = 29400
PLACEHOLDER_IMAGE = "registry.example.com/arflow:latest"
IMAGE_UID = 10001  # the Dockerfile's ARFLOW_UID
SHM_MOUNT = "/dev/shm"
PVC_MOUNT = "/mnt/arflow"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variant", choices=("pytorchjob", "job"), default="pytorchjob")
    p.add_argument("--name", required=True, help="job name (DNS label: lowercase, digits, '-')")
    p.add_argument("--namespace", default=None)
    p.add_argument(
        "--image",
        default=os.environ.get("ARFLOW_IMAGE", PLACEHOLDER_IMAGE),
        help="the image built from the Dockerfile, as pushed to your registry "
        f"(default: $ARFLOW_IMAGE, else the placeholder {PLACEHOLDER_IMAGE})",
    )
    p.add_argument(
        "--uid",
        type=int,
        default=IMAGE_UID,
        help=f"user and fsGroup the pods run as: the image's user (default {IMAGE_UID})",
    )
    p.add_argument("--nodes", type=int, required=True, help="pods (one per node)")
    p.add_argument(
        "--gpus-per-node", type=int, required=True, help="GPUs per pod = processes per pod"
    )
    p.add_argument(
        "--min-nodes",
        type=int,
        help="elastic minimum: the job goes on with at least this many pods (default: --nodes)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="torchrun / Job restarts after failures (membership changes do not count)",
    )
    p.add_argument(
        "--config",
        default="xl_256",
        help="a config shipped with arflow (xl_256) or a path inside the pod (image, PVC)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override (repeatable)",
    )
    p.add_argument(
        "--checkpoint-dir", help="checkpoint.dir: s3://bucket/prefix or a path under the PVC mount"
    )
    p.add_argument(
        "--pvc", help=f"PersistentVolumeClaim mounted at {PVC_MOUNT} (runs, checkpoints)"
    )
    p.add_argument(
        "--s3-secret",
        help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_DEFAULT_REGION)",
    )
    p.add_argument("--s3-endpoint", help="AWS_ENDPOINT_URL for S3-compatible stores")
    p.add_argument(
        "--grace-period",
        type=int,
        default=300,
        help="terminationGracePeriodSeconds: time to finish a step and save (default 300)",
    )
    p.add_argument("--shm-size", default="64Gi", help="size of the /dev/shm memory volume")
    p.add_argument("--cpu", default="32", help="CPU request per pod")
    p.add_argument("--memory", default="512Gi", help="memory request per pod")
    p.add_argument("--out", help="write the YAML here instead of stdout")
    args = p.parse_args(argv)
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", args.name):
        p.error(f"--name {args.name!r} must be a DNS label of at most 42 characters")
    if args.nodes < 1 or args.gpus_per_node < 1:
        p.error("--nodes and --gpus-per-node must be >= 1")
    if args.min_nodes is not None and not 1 <= args.min_nodes <= args.nodes:
        p.error(f"--min-nodes must lie in [1, --nodes={args.nodes}]")
    if args.uid < 1:
        p.error("--uid must name a non-root user (>= 1)")
    if args.grace_period < 30:
        p.error("--grace-period must leave the trainer at least 30 s to save")
    return args


def rendezvous_host(args) -> str:
    if args.variant == "pytorchjob":
        return f"{args.name}-master-0"  # the operator's service for the master replica
    return f"{args.name}-0.{args.name}"  # pod 0 of the Indexed Job, through the headless service


def train_command(args) -> list[str]:
    nnodes = (
        f"{args.min_nodes}:{args.nodes}"
        if args.min_nodes and args.min_nodes != args.nodes
        else str(args.nodes)
    )
    cmd = [
        "torchrun",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={args.gpus_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={rendezvous_host(args)}:{RDZV_PORT}",
        f"--rdzv_id={args.name}",
        f"--max_restarts={args.max_restarts}",
        "-m",
        "arflow",
        "train",
        "--config",
        args.config,
        "--resume",
        "auto",
    ]
    overrides = list(args.set)
    if args.checkpoint_dir:
        overrides.append(f"checkpoint.dir={args.checkpoint_dir}")
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def container(args) -> dict:
    env = [
        {
            "name": "TORCHELASTIC_SIGNALS_TO_HANDLE",
            "value": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        },
        # torchrun waits this long for the trainers to save before it kills them.
        {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(args.grace_period - 10)},
        # A store of its own for each rendezvous round (see the module docstring).
        {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"},
    ]
    if args.s3_endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": args.s3_endpoint})
    mounts = [{"name": "dshm", "mountPath": SHM_MOUNT}]
    if args.pvc:
        mounts.append({"name": "data", "mountPath": PVC_MOUNT})
    spec = {
        "name": "pytorch",  # the name the training operator expects
        "image": args.image,
        "command": train_command(args),
        "env": env,
        "ports": [{"name": "rdzv", "containerPort": RDZV_PORT}],
        "resources": {
            "requests": {
                "cpu": args.cpu,
                "memory": args.memory,
                "nvidia.com/gpu": args.gpus_per_node,
            },
            "limits": {"nvidia.com/gpu": args.gpus_per_node},
        },
        "volumeMounts": mounts,
    }
    if args.s3_secret:
        spec["envFrom"] = [{"secretRef": {"name": args.s3_secret}}]
    return spec


def pod_spec(args, restart_policy: str) -> dict:
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": args.shm_size}}]
    if args.pvc:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": args.pvc}})
    return {
        "restartPolicy": restart_policy,
        "terminationGracePeriodSeconds": args.grace_period,
        # The image's user; fsGroup gives it the mounted volumes (the PVC is root's otherwise).
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": args.uid,
            "runAsGroup": args.uid,
            "fsGroup": args.uid,
        },
        "containers": [container(args)],
        "volumes": volumes,
    }


def metadata(args, **extra) -> dict:
    meta = {
        "name": args.name,
        "labels": {"app.kubernetes.io/name": "arflow", "arflow/job": args.name},
    }
    if args.namespace:
        meta["namespace"] = args.namespace
    meta.update(extra)
    return meta


def pytorchjob(args) -> list[dict]:
    def replica(count: int) -> dict:
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {
                "metadata": {"labels": {"arflow/job": args.name}},
                "spec": pod_spec(args, "OnFailure"),
            },
        }

    replicas = {"Master": replica(1)}
    if args.nodes > 1:
        replicas["Worker"] = replica(args.nodes - 1)
    return [
        {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "metadata": metadata(args),
            "spec": {
                "nprocPerNode": str(args.gpus_per_node),
                "elasticPolicy": {
                    "rdzvBackend": "c10d",
                    "rdzvPort": RDZV_PORT,
                    "minReplicas": args.min_nodes or args.nodes,
                    "maxReplicas": args.nodes,
                    "maxRestarts": args.max_restarts,
                },
                "pytorchReplicaSpecs": replicas,
            },
        }
    ]


def indexed_job(args) -> list[dict]:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(args),
        "spec": {
            "clusterIP": "None",  # headless: DNS names for the pods, no load balancing
            "selector": {"arflow/job": args.name},
            "ports": [{"name": "rdzv", "port": RDZV_PORT}],
            "publishNotReadyAddresses": True,
        },
    }
    pod = pod_spec(args, "Never")
    pod["subdomain"] = args.name  # pods become <name>-<index>.<name>
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(args),
        "spec": {
            "completionMode": "Indexed",
            "completions": args.nodes,
            "parallelism": args.nodes,
            "backoffLimit": args.max_restarts * args.nodes,
            "template": {"metadata": {"labels": {"arflow/job": args.name}}, "spec": pod},
        },
    }
    return [service, job]


def render(args) -> list[dict]:
    return pytorchjob(args) if args.variant == "pytorchjob" else indexed_job(args)


def main(argv=None) -> int:
    import yaml

    args = parse_args(argv)
    if args.image == PLACEHOLDER_IMAGE:
        print(
            f"render: the image is the placeholder {PLACEHOLDER_IMAGE}: pass --image (or set "
            "ARFLOW_IMAGE) to the image you built from the Dockerfile and pushed",
            file=sys.stderr,
        )
    text = yaml.safe_dump_all(render(args), sort_keys=False)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
