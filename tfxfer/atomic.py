"""Files that appear whole or not at all.

Everything a run writes goes to a temporary name beside its target and is then
renamed over it (`os.replace`, atomic on POSIX and Windows within a folder). A
run killed at any moment leaves either the previous file or the new one, never
half of one that a later command would trust. Leftover temporaries are named
`tmp-<pid>-<name>` and nothing reads them.
"""

import contextlib
import json
import os

from tfxfer import owned

__all__ = ["replacing", "write_text", "write_json", "write_npz", "read_json"]


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary path beside `path`, with the same suffix, for a file
    or a folder; when the block succeeds it becomes `path`, else it is removed.
    A folder that exists is moved aside first and deleted after: in between
    there is briefly no folder, never a half-written one."""
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f"tmp-{os.getpid()}-{name}")
    old = os.path.join(directory, f"tmp-{os.getpid()}-old-{name}")
    try:
        yield temporary
        if os.path.isdir(temporary):
            if os.path.isdir(path):
                os.rename(path, old)
            os.rename(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        for leftover in (temporary, old):
            owned.remove(leftover, "temporary")


def write_text(path, text):
    with replacing(path) as temporary:
        with open(temporary, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_npz(path, **arrays):
    """`np.savez` of `arrays` at `path`."""
    import numpy as np

    with replacing(path) as temporary:
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
