"""TensorFlow kernels of tfxfer's own, compiled at first use.

One kernel so far: `anchored_momentum.cc`, SGD's momentum update with the
L2-SP pull folded in (`tfxfer.optim.SGD` uses it). It is C++ against the
installed TensorFlow's headers, so it is built on the machine that runs it,
once per TensorFlow version and source, with the C++ compiler `CXX` (default
`g++`), into `TFXFER_KERNEL_DIR` (default `~/.cache/tfxfer/kernels`); the
build takes some 15 s. Where it cannot be built (no compiler, no headers),
tfxfer says so once and computes the same update with TensorFlow's own ops,
which is slower. `TFXFER_KERNELS=0` turns the kernels off.
"""

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import tensorflow as tf

__all__ = ["anchored_momentum", "unavailable_reason", "KERNEL_DIR"]

KERNEL_DIR = os.environ.get("TFXFER_KERNEL_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tfxfer", "kernels")
_SOURCE = os.path.join(os.path.dirname(__file__), "anchored_momentum.cc")
_reasons = {}


def anchored_momentum():
    """The loaded op library with `tfxfer_anchored_momentum`, or None (then
    `unavailable_reason()` says why, and it was printed once)."""
    return _load(_SOURCE)


def unavailable_reason():
    """Why the last kernel asked for is not available, or None."""
    return _reasons.get(_SOURCE)


@functools.cache
def _load(source):
    if os.environ.get("TFXFER_KERNELS", "1") == "0":
        return _without(source, "TFXFER_KERNELS=0")
    if tf.config.list_physical_devices("GPU"):
        return _without(source, "it has a CPU kernel only and a GPU is visible", quiet=True)
    try:
        return tf.load_op_library(_build(source))
    except (OSError, RuntimeError, subprocess.SubprocessError, tf.errors.OpError) as error:
        return _without(source, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)


def _without(source, reason, quiet=False):
    _reasons[source] = reason
    if not quiet:
        print(f"tfxfer: the fused L2-SP update is off ({reason}); TensorFlow's own ops compute it, a few percent slower.",
              file=sys.stderr)
    return None


def _build(source):
    """The path of `source` compiled into a shared library, built if missing.
    The name holds a hash of the source, the TensorFlow version and the flags,
    so an upgrade of either builds afresh; two processes building at once
    each write their own file and rename it into place."""
    flags = [*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]
    compiler = os.environ.get("CXX", "g++")
    with open(source, "rb") as f:
        key = hashlib.sha256(f.read() + repr((tf.__version__, flags, compiler)).encode()).hexdigest()[:16]
    name = os.path.splitext(os.path.basename(source))[0]
    target = os.path.join(KERNEL_DIR, f"{name}-{key}.so")
    if os.path.exists(target):
        return target
    if shutil.which(compiler) is None:
        raise OSError(f"no C++ compiler {compiler!r} on PATH; set CXX or install g++")
    os.makedirs(KERNEL_DIR, exist_ok=True)
    print(f"tfxfer: compiling {os.path.basename(source)} for TensorFlow {tf.__version__} (once, about 15 s)", file=sys.stderr)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=KERNEL_DIR)
    os.close(handle)
    try:
        # -O3 without -march: the library may be shared by machines with other
        # CPUs, and without FMA contraction the update rounds as TensorFlow's.
        command = [compiler, "-shared", "-fPIC", "-O3", "-w", source, "-o", temporary, *flags]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()[-1:]
            raise RuntimeError(f"{compiler} could not build {os.path.basename(source)}: {errors[0] if errors else done.returncode}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return target
