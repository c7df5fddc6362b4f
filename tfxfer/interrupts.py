"""SIGTERM stops a command as Ctrl-C does.

A scheduler or a container stops a process with SIGTERM. Python's default for
it ends the process at once, so nothing that cleans up on Ctrl-C runs: the
MLflow run stays RUNNING for ever. Raised as a `KeyboardInterrupt` instead, it
takes Ctrl-C's way out: the MLflow run ends KILLED (`tfxfer.tracking.ending`)
and the run's last checkpoint stays for `--resume`.
"""

import contextlib
import signal

__all__ = ["Terminated", "sigterm_interrupts"]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt."""


@contextlib.contextmanager
def sigterm_interrupts():
    """Within the block, SIGTERM raises `Terminated` in the main thread (the
    only one that may handle signals; elsewhere SIGTERM is left alone)."""

    def terminate(signum, frame):
        raise Terminated()

    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # a parent chose to ignore it: so do we
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        # None: a handler installed outside Python, which only the default can stand for.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
