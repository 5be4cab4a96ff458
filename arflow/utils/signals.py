"""Preemption: SLURM and Kubernetes send SIGTERM (SLURM's --signal often SIGUSR1), then kill
after a grace period. The trainer finishes the current step, saves a checkpoint and exits 0.

The signals are blocked in the training thread, not just handled: processes forked from it
inherit the mask, so data-loader workers (whose own C-level SIGTERM handler would kill them
and make the DataLoader abort the trainer mid-save) survive a job-wide SIGTERM until the
checkpoint is written. A handler still records a signal delivered to any other thread; blocked
ones stay pending and are polled at step boundaries.
"""

from __future__ import annotations

import signal


class PreemptionFlag:
    SIGNALS = {signal.SIGTERM, signal.SIGUSR1}

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> PreemptionFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def poll(self) -> bool:
        """True once SIGTERM or SIGUSR1 arrived (handled, or pending while blocked)."""
        if self.received is None:
            pending = signal.sigpending() & self.SIGNALS
            if pending:
                self.received = min(pending)
        return self.received is not None

    def restore(self) -> None:
        # Consume pending signals first: unblocked, a pending SIGTERM would kill the process
        # before it can exit 0.
        while signal.sigtimedwait(self.SIGNALS, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
