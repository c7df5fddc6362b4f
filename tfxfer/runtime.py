"""What the machine offers, and the process-wide TensorFlow settings that follow.

Imported by `tfxfer/__init__.py` before TensorFlow, because one of them, oneDNN,
is read once when TensorFlow loads:

* **oneDNN.** TensorFlow turns its oneDNN kernels on by default only on CPUs with
  AVX-512 VNNI/BF16 or AMX; elsewhere (AVX2 CPUs) it runs Eigen kernels, 5-8x
  slower for a ResNet50 training step (measured on an AVX2-only EPYC). tfxfer
  sets `TF_ENABLE_ONEDNN_OPTS=1` unless the user chose a value.
* **Precision.** `auto` computes in bfloat16 only where the hardware has it (AMX
  or AVX512-BF16 CPUs, GPUs of compute capability 8.0 and up); on AVX2 bfloat16
  is emulated and slower than float32.
"""

import contextlib
import functools
import os
import sys
import warnings
from tfxfer.errors import did_you_mean

__all__ = [
    "PRECISIONS",
    "quiet_logging",
    "load_tensorflow_quietly",
    "replayed_on_failure",
    "enable_onednn",
    "onednn_enabled",
    "cpu_flags",
    "has_bf16",
    "resolve_precision",
    "precision_reason",
    "set_precision",
]

ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
# CPU flags (Linux /proc/cpuinfo names) of native bfloat16 arithmetic.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
_quiet_start = False


def quiet_logging():
    """TensorFlow's C++ warnings and info lines off, unless the user chose a level;
    then `load_tensorflow_quietly` also hides the lines TensorFlow prints before
    its logging starts, unless the user asked for everything with level 0.
    Call before TensorFlow loads."""
    global _quiet_start
    level = os.environ.get(LOG_LEVEL_VARIABLE)
    if level is None:
        os.environ[LOG_LEVEL_VARIABLE] = "2"
    _quiet_start = level is None or level.strip() not in ("", "0")


def load_tensorflow_quietly():
    """Import TensorFlow and look for its devices with their output held back
    (`replayed_on_failure`), and shown only if that fails.

    TensorFlow prints several lines at import and at its first device query
    (the oneDNN notice, "Could not find cuda drivers", "failed call to cuInit"
    on a machine without a GPU) through absl before absl's logging starts, so
    `TF_CPP_MIN_LOG_LEVEL` does not reach them. A user who set that variable
    to 0 gets TensorFlow's own output.
    """
    if not _quiet_start or "tensorflow" in sys.modules:
        return
    with replayed_on_failure():
        import tensorflow as tf

        tf.config.list_physical_devices()


@contextlib.contextmanager
def replayed_on_failure():
    """Hold back what the block prints, and print it on standard error only if
    the block raises: file descriptors 1 and 2 (C++ logging, absl, Python's
    own streams and the logging handlers that write to them) go to a temporary
    file, and `sys.stdout`/`sys.stderr` to a buffer, for the streams a host
    (a notebook, click's test runner) put in their place."""
    import io
    import tempfile

    buffer = io.StringIO()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    with tempfile.TemporaryFile() as sink:
        failed, saved = False, {}
        try:
            for fd in (1, 2):
                with contextlib.suppress(OSError):  # a descriptor the host closed stays as it is
                    saved[fd] = os.dup(fd)
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                yield
        except BaseException:
            failed = True
            raise
        finally:
            for stream in (sys.__stdout__, sys.__stderr__):
                with contextlib.suppress(AttributeError, ValueError, OSError):
                    stream.flush()
            for fd, original in saved.items():
                os.dup2(original, fd)
                os.close(original)
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace") + buffer.getvalue())
                sys.stderr.flush()


def enable_onednn():
    """Turn TensorFlow's oneDNN kernels on, if TensorFlow is not loaded yet and
    the user did not choose. Returns True when tfxfer set the variable."""
    if ONEDNN_VARIABLE in os.environ:
        return False
    if "tensorflow" not in sys.modules:
        os.environ[ONEDNN_VARIABLE] = "1"
        return True
    if not onednn_enabled() and _is_x86():
        warnings.warn(
            "TensorFlow was imported before tfxfer with its oneDNN kernels off, which makes "
            f"training on this CPU several times slower; import tfxfer first or set {ONEDNN_VARIABLE}=1 "
            "before TensorFlow loads.",
            stacklevel=3,
        )
    return False


def onednn_enabled():
    """True when the loaded TensorFlow runs its oneDNN kernels.

    TensorFlow has no public query for it; `IsMklEnabled` is the one its own
    tests use (tests/test_speedups.py fails if it moves).
    """
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def _is_x86():
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


@functools.lru_cache(maxsize=None)
def cpu_flags():
    """The CPU's feature flags as a set (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def describe_cpu():
    """`"MODEL (flags avx2 fma ...), N cores"`: what every benchmark figure is reported beside."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    flags = [f for f in wanted if f in cpu_flags()]
    return f"{cpu_name()} (flags {' '.join(flags) or 'none of ' + ' '.join(wanted)}), {os.cpu_count()} cores"


def cpu_name():
    """The CPU model name, for reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _gpu_capabilities():
    import tensorflow as tf

    capabilities = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        capabilities.append(tuple(details.get("compute_capability") or (0, 0)))
    return capabilities


def has_bf16(flags=None, gpu_capabilities=None):
    """True where bfloat16 arithmetic is native: every GPU has compute capability
    >= 8.0, or (no GPU) the CPU has AMX-BF16, AVX512-BF16 or Arm BF16."""
    gpus = _gpu_capabilities() if gpu_capabilities is None else gpu_capabilities
    if gpus:
        return all(c >= (8, 0) for c in gpus)
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_CPU_FLAGS)


def resolve_precision(precision="auto", flags=None, gpu_capabilities=None):
    """The Keras dtype policy name for `precision` (one of `PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise did_you_mean(precision, PRECISIONS, "precision")
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if has_bf16(flags, gpu_capabilities) else "float32"


def precision_reason(precision="auto", flags=None, gpu_capabilities=None):
    """Why `precision` resolves as it does, in words, for the run's start line."""
    if precision != "auto":
        return "as asked"
    gpus = _gpu_capabilities() if gpu_capabilities is None else gpu_capabilities
    if has_bf16(flags, gpus):
        native = "every GPU has compute capability 8.0 or more" if gpus else "the CPU has " + ", ".join(
            f for f in BF16_CPU_FLAGS if f in (cpu_flags() if flags is None else flags))
        # BENCHMARKS.md: the step runs 1.2-1.6x faster in bfloat16 there, at 32 and 224 px.
        return f"auto: {native}, where bfloat16 trains faster than float32"
    return "auto: no native bfloat16 here, where emulating it is slower than float32"


def set_precision(precision="auto"):
    """Set Keras's global dtype policy from `precision`; return the policy name
    and why it was chosen."""
    import keras

    policy = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(policy)
    return policy, precision_reason(precision)
