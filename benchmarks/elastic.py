#!/usr/bin/env python
"""Elastic restarts under torchrun's elastic agent, timed; prints one JSON document.

    python benchmarks/elastic.py --backend fsdp2                      # torchrun's default timeouts
    python benchmarks/elastic.py --backend deepspeed --rdzv-conf last_call_timeout=2,keep_alive_interval=1
    python benchmarks/elastic.py --config my.json --set data.url=synthetic

Three torchrun agents on this machine stand for three nodes, one worker each, one job: c10d
rendezvous on loopback, `--nnodes 1:2 --max-restarts 3`, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.
Each agent imports torchrun first and waits for a go-file before it calls torchrun's entry point,
so the timings below leave out the agent's own start-up (a node's boot, not the job's recovery).
  1. `a` (it hosts the rendezvous store: its node must outlive the job) and `b` train at world
     size 2 (a `b` too late for the first round joins through a membership change);
  2. once a checkpoint of world size 2 is committed, `b` and its worker are SIGKILLed the moment
     the next (background) save has created its step directory: a node lost in mid-save. `a`'s
     worker fails on the broken connection, `a`'s agent restarts it at world size 1 and it
     resumes from the newest committed checkpoint, resharded; the save in flight is removed;
  3. after two steps at world size 1, `c` joins: `a`'s agent stops its worker (SIGTERM: it
     finishes the step, saves and exits) and the job continues at world size 2, `c`'s worker
     as rank 0 (its node address sorts first: rank 0 moves to the new node);
  4. the run ends at train.steps.

Reported, per event: the world size of the round that followed (torchrun's "Rendezvous complete"
log), the step the trainer resumed from and the newest committed checkpoint when the round
formed (they must agree), the steps lost, and the seconds from the event to the first training
step after it (`metrics.jsonl` time stamps): `recovery_s` from the SIGKILL, `join_s` from the
go of the joining agent. Within the recovery, counted from the kill as well:
`failure_detected_s` (the survivor's agent saw its worker fail) and `rendezvous_s` (the new round
formed: the lost node's heartbeat has to expire, then the last call for more nodes runs out);
`restart_s` is the rest (worker start-up, checkpoint load, the first step). Figures from a
loaded machine are noisy: say so when you quote them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = str(ROOT / "launchers" / "train.py")
# The digits demo's model on synthetic data (nothing to prepare); steps and saves made frequent.
DEFAULT_CONFIG = str(ROOT / "configs" / "digits_cpu.json")
DEFAULT_SETS = ["data.url=synthetic", "data.num_workers=0", "logging.wandb=false"]

# torchrun's entry point behind a gate: the imports happen at once, the agent starts on the go.
GATED_TORCHRUN = """
import os, sys, time
from torch.distributed.run import main
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
main(sys.argv[2:])
"""

ROUND = re.compile(
    r"Rendezvous complete for workers.*?group_rank=(\d+).*?global_world_sizes=\[(\d+)", re.S
)
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
REMOVED = re.compile(r"removed incomplete checkpoints at steps \[([\d, ]*)\]")
STEP_DIR = re.compile(r"step_(\d+)$")


class ScenarioError(RuntimeError):
    """The job did not go through the scenario; the message carries the agents' log tails."""


@dataclass
class Agent:
    """One torchrun agent (a "node") with its log, gated by a go-file."""

    name: str
    local_addr: str
    log: Path
    go: Path
    proc: subprocess.Popen | None = None
    released_at: float | None = None

    def start(self, torchrun_args: list[str], env: dict) -> None:
        args = [*torchrun_args[:1], f"--local-addr={self.local_addr}", *torchrun_args[1:]]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", GATED_TORCHRUN, str(self.go), *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def release(self) -> None:
        self.go.touch()
        self.released_at = time.time()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def rounds(self) -> list[dict]:
        """The rendezvous rounds this agent took part in: its group rank, the world size."""
        return [
            {"group_rank": int(rank), "world_size": int(world)}
            for rank, world in ROUND.findall(self.text())
        ]

    def kill_node(self) -> None:
        """SIGKILL the agent and every process below it at once, as when a node dies (the
        workers run in sessions of their own, so a process-group kill would miss them)."""
        import psutil

        agent = psutil.Process(self.proc.pid)
        tree = [*agent.children(recursive=True), agent]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(tree, timeout=30)
        self.proc.wait()

    def stop(self) -> None:
        """End whatever is left of this agent (after a failure or a timeout)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill_node()


def metrics_rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run_dir / name
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # being written
            continue
        if "loss" in row:
            rows.append(row)
    return rows


def step_dirs(ckpt_dir: Path) -> dict[int, bool]:
    """step -> committed (meta.json present), for every step directory now."""
    out = {}
    for name in os.listdir(ckpt_dir) if ckpt_dir.exists() else ():
        m = STEP_DIR.match(name)
        if m:
            out[int(m.group(1))] = (ckpt_dir / name / "meta.json").exists()
    return out


def committed_world_sizes(ckpt_dir: Path) -> dict[int, int]:
    """step -> world size recorded in each committed checkpoint's meta.json."""
    out = {}
    for step, committed in step_dirs(ckpt_dir).items():
        if committed:
            meta = json.loads((ckpt_dir / f"step_{step:09d}" / "meta.json").read_text())
            out[step] = meta["world_size"]
    return out


@dataclass
class Scenario:
    workdir: Path
    config: str
    sets: list[str]
    backend: str | None = None
    steps: int = 30
    every: int = 2
    rdzv_conf: str = ""
    timeout: float = 600.0
    agents: dict[str, Agent] = field(default_factory=dict)

    def __post_init__(self):
        self.run_dir = self.workdir / "run"
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.deadline = time.monotonic() + self.timeout

    # ------------------------------------------------------------------ set-up
    def train_sets(self) -> list[str]:
        sets = [
            *self.sets,
            f"run.dir={self.run_dir}",
            f"train.steps={self.steps}",
            f"checkpoint.every={self.every}",
            "checkpoint.keep_last=1000",  # every checkpoint stays: the report reads them all
            "checkpoint.async_save=true",
            "logging.every=1",
            "logging.progress=false",
        ]
        if self.backend:
            sets.append(f"parallel.backend={self.backend}")
        return [a for s in sets for a in ("--set", s)]

    def torchrun_args(self, port: int) -> list[str]:
        args = [
            "--nnodes=1:2",
            "--nproc-per-node=1",
            "--max-restarts=3",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=elastic-benchmark",
        ]
        if self.rdzv_conf:
            args.append(f"--rdzv-conf={self.rdzv_conf}")
        # --local-addr is inserted after the first argument (Agent.start)
        return [*args, LAUNCHER, "--config", self.config, "--resume", "auto", *self.train_sets()]

    def env(self) -> dict:
        return dict(
            os.environ,
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            WANDB_MODE="disabled",
            LOGLEVEL="INFO",  # torchrun's rendezvous results (world size of each round)
            # torchrun (<= 2.14 at least) shares one TCPStore across rounds and never refreshes
            # a cached copy of its address: a node joining a running job, or rank 0 moving to
            # another node, then fails every restart. Elastic jobs turn the sharing off.
            TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        )

    # ------------------------------------------------------------------ waiting
    def logs(self) -> str:
        return "\n".join(
            f"--- agent {a.name} ---\n{a.text()[-5000:]}" for a in self.agents.values()
        )

    def wait_for(self, what: str, condition, poll: float = 0.02):
        while True:
            value = condition()
            if value:
                return value
            for agent in self.agents.values():
                if agent.proc.poll() is not None and agent.name != "b":
                    raise ScenarioError(
                        f"agent {agent.name} exited ({agent.proc.returncode}) while waiting for "
                        f"{what}\n{self.logs()}"
                    )
            if time.monotonic() > self.deadline:
                raise ScenarioError(f"timed out waiting for {what}\n{self.logs()}")
            time.sleep(poll)

    def listening(self, port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def new_round(self, agent: Agent, seen: int) -> dict | None:
        rounds = agent.rounds()
        return rounds[-1] if len(rounds) > seen else None

    def resumed_after(self, offsets: dict[str, int]) -> tuple[str, int] | None:
        for name, agent in self.agents.items():
            m = RESUMED.search(agent.text()[offsets[name] :])
            if m:
                return m.group(1), int(m.group(2))
        return None

    def first_step_after(self, step: int, since: float) -> dict | None:
        """The row of `step` logged after time `since` (an earlier run's row of that step is
        moved aside when the next run resumes before it)."""
        return next(
            (r for r in metrics_rows(self.run_dir) if r["step"] == step and r["time"] > since),
            None,
        )

    def trained_before(self, t: float) -> int:
        """The last step logged before time `t`, including rows a later resume moved aside."""
        rows = metrics_rows(self.run_dir) + metrics_rows(self.run_dir, "metrics.superseded.jsonl")
        return max((r["step"] for r in rows if r["time"] < t), default=0)

    def offsets(self) -> dict[str, int]:
        return {name: len(agent.text()) for name, agent in self.agents.items()}

    def restart(self, survivor: Agent, rounds_seen: int, event_time: float) -> dict:
        """After an event: the survivor's next round, the checkpoints committed when it formed,
        the step the trainer resumed from, and the first step trained after it."""
        offsets = self.offsets()
        round_ = self.wait_for(
            f"a new round on agent {survivor.name}", lambda: self.new_round(survivor, rounds_seen)
        )
        formed = time.time()
        committed = sorted(s for s, done in step_dirs(self.ckpt_dir).items() if done)
        url, resumed = self.wait_for(
            "the trainer's resume line", lambda: self.resumed_after(offsets)
        )
        first = self.wait_for(
            f"step {resumed + 1} after the restart",
            lambda: self.first_step_after(resumed + 1, formed),
        )
        trained = self.trained_before(formed)
        return {
            "world_size": round_["world_size"],
            "trained_before": trained,
            "steps_lost": trained - resumed,
            "newest_committed": max(committed, default=None),
            "resumed_from": resumed,
            "resumed_url": url,
            "rendezvous_s": round(formed - event_time, 2),
            "first_step_s": round(first["time"] - event_time, 2),
        }

    # ------------------------------------------------------------------ the scenario
    def run(self) -> dict:
        from arflow.distributed.env import free_port

        shutil.rmtree(self.workdir / "agents", ignore_errors=True)
        (self.workdir / "agents").mkdir(parents=True)
        port = free_port()
        # Node addresses decide the ranks (sorted): a < b, and c < a, so c becomes rank 0.
        for name, addr in (("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.1")):
            d = self.workdir / "agents"
            self.agents[name] = Agent(name, addr, d / f"{name}.log", d / f"{name}.go")
        a, b, c = self.agents["a"], self.agents["b"], self.agents["c"]
        try:
            for agent in (a, b, c):
                agent.start(self.torchrun_args(port), self.env())
            a.release()
            self.wait_for("the rendezvous store of agent a", lambda: self.listening(port), 0.05)
            b.release()
            return self._events(a, b, c)
        finally:
            for agent in self.agents.values():
                agent.stop()

    def _events(self, a: Agent, b: Agent, c: Agent) -> dict:
        report: dict = {"steps": self.steps, "checkpoint_every": self.every}
        # 1. World size 2, then b dies while a save of world size 2 is being written.
        self.wait_for("a round of world size 2", lambda: 2 in {r["world_size"] for r in a.rounds()})
        self.wait_for(
            "a committed checkpoint of world size 2",
            lambda: 2 in set(committed_world_sizes(self.ckpt_dir).values()),
        )
        before = committed_world_sizes(self.ckpt_dir)
        in_flight = self.wait_for(
            "a save in flight",
            lambda: next(
                (s for s, done in step_dirs(self.ckpt_dir).items() if not done and s > max(before)),
                None,
            ),
            poll=0.002,
        )
        rounds_seen = len(a.rounds())
        kill_time = time.time()
        b.kill_node()
        kill = self.restart(a, rounds_seen, kill_time)
        failed = _first_line_time(a.text(), "failed (exitcode")
        kill.update(
            save_in_flight=in_flight,
            removed_incomplete=_removed(self),
            recovery_s=kill.pop("first_step_s"),
            failure_detected_s=None if failed is None else round(failed - kill_time, 2),
        )
        kill["restart_s"] = round(kill["recovery_s"] - kill["rendezvous_s"], 2)
        report["kill"] = kill

        # 2. Two steps at world size 1, then c joins.
        resumed = kill["resumed_from"]
        self.wait_for(f"step {resumed + 2}", lambda: self.first_step_after(resumed + 2, kill_time))
        rounds_seen = len(a.rounds())
        c.release()
        join = self.restart(a, rounds_seen, c.released_at)
        join.update(
            join_s=join.pop("first_step_s"),
            rank_of_new_node=c.rounds()[-1]["group_rank"] if c.rounds() else None,
        )
        report["join"] = join

        # 3. The end.
        codes = {}
        for agent in (a, c):
            remaining = max(1.0, self.deadline - time.monotonic())
            try:
                codes[agent.name] = agent.proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                raise ScenarioError(f"the job did not end in time\n{self.logs()}") from None
        rows = metrics_rows(self.run_dir)
        report["end"] = {
            "exit_codes": codes,
            "last_step": max((r["step"] for r in rows), default=0),
            "steps_logged": sorted(r["step"] for r in rows),
            "world_size_by_checkpoint": committed_world_sizes(self.ckpt_dir),
            "exported": (self.run_dir / "model.safetensors").exists(),
        }
        return report


def _removed(scenario: Scenario) -> list[int]:
    out = []
    for agent in scenario.agents.values():
        for found in REMOVED.findall(agent.text()):
            out += [int(s) for s in found.split(",") if s.strip()]
    return sorted(set(out))


def _first_line_time(text: str, needle: str) -> float | None:
    """The time stamp of torchrun's first log line containing `needle` (glog format,
    `E1207 23:17:56.429000 ...`, local time, no year)."""
    for line in text.splitlines():
        if needle in line:
            m = re.match(r"[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+)", line)
            if m:
                mon, day, hh, mm, ss, frac = m.groups()
                now = time.localtime()
                stamp = time.mktime(
                    (now.tm_year, int(mon), int(day), int(hh), int(mm), int(ss), 0, 0, -1)
                )
                return stamp + float(f"0.{frac}")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=None, metavar="KEY=VALUE")
    parser.add_argument("--backend", choices=("fsdp2", "deepspeed", "ddp"), default="fsdp2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=2, help="checkpoint.every")
    parser.add_argument(
        "--rdzv-conf", default="", help="torchrun --rdzv-conf (default: torchrun's own timeouts)"
    )
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="arflow-elastic-"))
    scenario = Scenario(
        workdir,
        args.config,
        DEFAULT_SETS if args.set is None else args.set,
        backend=args.backend,
        steps=args.steps,
        every=args.every,
        rdzv_conf=args.rdzv_conf,
        timeout=args.timeout,
    )
    report = scenario.run()
    report.update(
        backend=args.backend,
        rdzv_conf=args.rdzv_conf or "torchrun defaults",
        cpus=os.cpu_count(),
        load_average_1min=os.getloadavg()[0],
        workdir=str(workdir),
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
