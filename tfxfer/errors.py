"""The one exception type a user can cause, and the "did you mean" helper."""

import difflib
import errno
import os

# What a failed download looks like from Keras's get_file (a plain Exception with
# this text), urllib, requests and tensorflow-datasets.
_NETWORK_TYPES = ("URLError", "HTTPError", "ConnectionError", "TimeoutError", "DownloadError", "NonMatchingChecksumError")
_NETWORK_TEXTS = ("URL fetch failure", "Name or service not known", "Failed to resolve", "Max retries exceeded")


class TfxferError(Exception):
    """A mistake the user can fix; the CLI prints its message as one sentence."""


def did_you_mean(name, choices, what):
    """Return a one-sentence error for an unknown `name`, naming close matches."""
    choices = sorted(choices)
    close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.5)
    if close:
        hint = "did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        hint = "choose one of: " + ", ".join(choices) + "."
    return TfxferError(f"Unknown {what} {name!r}; {hint}")


# errno values of a folder that cannot be written or a disk that is full.
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


# What a failed write advises, by default: the commands that write a run folder.
RUN_FOLDER_FIX = ("free space or choose a writable --output-dir, then run again (add --resume to continue a run from "
                  "its last finished epoch).")


def write_failure(error, fix=RUN_FOLDER_FIX):
    """A one-sentence `TfxferError` when `error` is a failed write (no permission,
    read-only or full disk, a file where a folder should be), else `None`;
    `fix` ends it, naming the options of the command that failed.
    TensorFlow's own writers raise their errors with the OS's message in them."""
    if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
        where = f" {os.fsdecode(error.filename)!r}" if error.filename else ""
        reason = error.strerror
    elif "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
        where, reason = "", "No space left on device"
    else:
        return None
    return TfxferError(f"Cannot write{where}: {reason}; {fix}")


def is_network_failure(error):
    """True when `error`, or an exception it was raised from, is a failed download."""
    while error is not None:
        if type(error).__name__ in _NETWORK_TYPES or isinstance(error, (ConnectionError, TimeoutError)):
            return True
        if any(text in str(error) for text in _NETWORK_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False
