"""Preemption notices: SLURM sends SIGTERM (or SIGUSR1 with --signal), Kubernetes SIGTERM, and
both kill after a grace period.

Before the first training step (start-up: imports, rendezvous, data and model set-up, loading a
checkpoint) a notice ends the process at once, with a message and exit status 128 + the signal
number: nothing has been trained since the latest checkpoint, so nothing is lost. From the training
loop on it is deferred: the trainer finishes the step, saves a checkpoint and exits 0.

The notices are caught by handlers, never blocked: a blocked signal mask is inherited by every
child process, and data-loader workers that cannot receive SIGTERM make the trainer hang at exit
(Python's multiprocessing terminates them and waits). Python runs a handler only in the main thread
between bytecodes, which may be hours away while that thread waits in a rendezvous or a collective;
so a helper thread reads the signal numbers that the C-level handler writes to a wakeup pipe
(`signal.set_wakeup_fd`) the moment a signal arrives, and acts on them.

Data-loader workers receive a job-wide SIGTERM too (SLURM signals every process of the job). One that
died of it would make the DataLoader abort the trainer in the middle of its save, so workers run
`data_worker_signals` (a DataLoader worker_init_fn): they outlive a job-wide notice and exit when
their parent terminates them (as the DataLoader and multiprocessing do at shutdown) or dies.
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionSignals:
    """SIGTERM / SIGUSR1 for the life of a training process (see the module docstring).

    signals = PreemptionSignals().install()   # start-up: a notice exits at once, with a message
    signals.defer()                            # training loop: recorded, polled at step boundaries
    signals.poll()                             # True once a notice arrived
    signals.restore()                          # previous handlers back
    """

    def __init__(self):
        self.received: int | None = None
        self._deferred = False
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    def install(self) -> PreemptionSignals:
        """Take over SIGTERM and SIGUSR1; call from the main thread."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)  # required by set_wakeup_fd
        self._pipe = (read_fd, write_fd)
        for sig in SIGNALS:
            # The Python-level handler does nothing; installing it makes the C-level handler
            # write the signal number to the wakeup pipe, which the thread reads.
            self._previous[sig] = signal.signal(sig, _ignore)
        self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, name="preemption-signals", daemon=True)
        self._thread.start()
        return self

    def defer(self) -> None:
        """From now on a notice is only recorded (the training loop polls it)."""
        self._deferred = True

    def poll(self) -> bool:
        """True once SIGTERM or SIGUSR1 arrived."""
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def restore(self) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        read_fd, write_fd = self._pipe
        os.close(write_fd)  # the thread reads end-of-file and returns
        self._thread.join()
        os.close(read_fd)
        self._pipe = None

    def _watch(self) -> None:
        read_fd = self._pipe[0]
        while data := os.read(read_fd, 64):
            for signum in data:  # other handled signals (SIGINT, ...) write here too
                if signum in SIGNALS:
                    self._arrived(signum)

    def _arrived(self, signum: int) -> None:
        if self.received is None:
            self.received = signum
        if self._deferred:
            return
        name = signal.Signals(signum).name
        status = 128 + signum
        rank = os.environ.get("RANK")  # set by the launchers (by init_distributed for python)
        prefix = f"rank {rank}: " if rank else ""
        # os.write, not print: the main thread may hold sys.stderr's lock.
        os.write(
            2,
            f"{prefix}{name} received during start-up, before the first training step: "
            f"exiting with status {status}; nothing was trained since the latest checkpoint, "
            f"so resuming loses nothing\n".encode(),
        )
        os._exit(status)


def _ignore(signum, frame) -> None:
    pass


def data_worker_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: outlive a job-wide SIGTERM / SIGUSR1 while the trainer saves,
    exit when the parent process terminates this worker or dies."""
    parent = os.getppid()
    # A forked worker inherits the trainer's wakeup pipe and handlers: signals sent to the worker
    # must not look like the trainer's own.
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    # SIGTERM is blocked in this thread (and in every thread it starts) and taken by a helper
    # thread, which can tell who sent it: the DataLoader's and multiprocessing's terminate() come
    # from the parent. torch's own worker handler would die of any SIGTERM.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(
        target=_exit_with_parent, args=(parent,), name="worker-signals", daemon=True
    ).start()


def _exit_with_parent(parent: int) -> None:
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, 1.0)
        if (info is not None and info.si_pid == parent) or os.getppid() != parent:
            os._exit(0)
