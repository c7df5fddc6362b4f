"""The rules of the output folder a run or a study works in: a plain folder
name, an exclusive lock while a process works there, and no temporaries left
behind by a process that was killed."""

import os
import time

from tfxfer import owned
from tfxfer.errors import TfxferError
from tfxfer.owned import LOCK_FILE

__all__ = ["RunFolderLock", "check_run_name", "in_use", "remove_leftovers"]


class RunFolderLock:
    """An exclusive OS lock on a run folder's `.lock` file, held while a run works there.

    The kernel releases it when the process ends, however it ends, so a killed
    run leaves no stale lock: `--resume` after a SIGKILL takes it at once. The
    file holds the holder's PID and start time, for the message a second
    process gets. The file is left in place when the lock is released:
    deleting it could let two processes hold locks on two different files.
    """

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._file = None

    def holder(self):
        """The holder's `"PID n, started at T"` as written in the file, or a stand-in."""
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except OSError:
            text = ""
        return text or "another process that is starting"

    def try_acquire(self, create):
        """Take the lock; `False` when another process holds it. With `create`
        false, a folder without a lock file is left as it is (nothing written)."""
        import fcntl

        if self._file is not None:
            return True
        if not create and not os.path.exists(self.path):
            return True
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._file = handle
        return True

    def stamp(self):
        """Write this process's PID and start time into the held lock's file."""
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"PID {os.getpid()}, started at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._file.flush()

    def release(self):
        if self._file is not None:
            self._file.close()  # closing the last descriptor releases the lock
            self._file = None


def check_run_name(name, flag="--run-name"):
    """A run name is one plain folder name: never a path that leaves --output-dir."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise TfxferError(f"{flag} {name!r} must be a plain folder name, without '/' or '..'.")


def in_use(path, lock, what="Run folder", flag="--run-name"):
    """The one sentence a process gets for a folder another process holds."""
    return TfxferError(f"{what} {path} is in use by {lock.holder()}; wait for it to finish, or choose another {flag}.")


def remove_leftovers(run_dir):
    """Delete the `tmp-*` files and folders a killed process left (`tfxfer.atomic`):
    the caller holds the folder's lock, so no live process is writing them."""
    for folder, subfolders, files in os.walk(run_dir):
        for name in [n for n in subfolders if not owned.foreign(os.path.join(folder, n), "temporary")]:
            owned.remove(os.path.join(folder, name), "temporary")
            subfolders.remove(name)
        for name in files:
            if not owned.foreign(os.path.join(folder, name), "temporary"):
                owned.remove(os.path.join(folder, name), "temporary")
