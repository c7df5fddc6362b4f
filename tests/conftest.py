import contextlib
import errno
import io
import ipaddress
import os
import shutil
import signal
import socket
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# tfxfer before anything that loads TensorFlow, so oneDNN is on for the tests.
import tfxfer  # noqa: E402, I001

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from tfxfer.backbones import BackboneSpec, register_backbone  # noqa: E402


def _tiny_builder(weights=None, include_top=False, input_shape=(32, 32, 3)):
    """A three-stage conv net with BatchNorm: the shape of a real backbone, tiny."""
    inputs = keras.Input(input_shape)
    x = inputs
    for stage, (filters, stride) in enumerate([(8, 2), (16, 2), (16, 1)]):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", name=f"s{stage}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"s{stage}_bn")(x)
        x = keras.layers.ReLU(name=f"s{stage}_relu")(x)
    model = keras.Model(inputs, x, name="tiny")
    if weights not in (None, "imagenet"):
        model.load_weights(weights)
    return model


register_backbone(
    BackboneSpec(
        "tiny",
        _tiny_builder,
        lambda x: x / 127.5 - 1.0,
        32,
        ("s0", "s1", "s2"),
        lambda name: name.split("_")[0] if name[:1] == "s" and name[1:2].isdigit() else None,
    )
)


@pytest.fixture(autouse=True)
def _fresh_keras():
    # Without Keras's gc.collect(), which costs about 0.3 s a call once TensorFlow is loaded;
    # Python's own collector still runs.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")


# The suite runs offline wherever it runs: a test that reaches past the loopback
# fails, so no test can pass because a download happened (or failed) somewhere.
_OUTSIDE_CONNECTIONS = []
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _is_local(sock, address):
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return True  # unix sockets, netlink
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def _guarded(connect):
    def guarded(sock, address):
        if not _is_local(sock, address):
            _OUTSIDE_CONNECTIONS.append(address)
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"the test suite is offline; refused {address!r}")
        return connect(sock, address)

    return guarded


socket.socket.connect, socket.socket.connect_ex = _guarded(_connect), _guarded(_connect_ex)


def _offline_download(*args, **kwargs):
    """What tensorflow-datasets' downloader meets on a machine without a network."""
    raise ConnectionError("Failed to establish a new connection: [Errno -3] Temporary failure in name resolution")


def _hermetic_tfds():
    from tensorflow_datasets.core.download import downloader
    from tensorflow_datasets.core.utils import gcs_utils

    # tfds probes its cloud bucket for prepared data; behind a firewall that drops packets each probe stalls.
    gcs_utils._is_gcs_disabled = True
    downloader._Downloader._sync_download = _offline_download


_hermetic_tfds()


def _descendants(pid):
    """The pids of the processes below `pid`, from /proc (empty where there is none)."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _kill_leftovers():
    """SIGKILL what this process started and left running (a failed or timed-out test's training
    subprocess, with its children); returns their pids."""
    leftovers = _descendants(os.getpid())
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


@pytest.fixture(autouse=True)
def _no_network_and_no_leftover_processes():
    before = len(_OUTSIDE_CONNECTIONS)
    yield
    _kill_leftovers()
    reached = _OUTSIDE_CONNECTIONS[before:]
    assert not reached, f"the test opened connections outside the loopback: {reached}"


def random_images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _encode(array, fmt, mode=None):
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_class_folder(root, classes=("cat", "dog"), per_class=6, size=40, seed=0):
    """Images of every supported kind under root/<class>/: JPEG, PNG, BMP, GIF,
    grayscale and RGBA. Each class has its own mean colour, so it is learnable."""
    rng = np.random.default_rng(seed)
    kinds = [("JPEG", None, "jpg"), ("PNG", None, "png"), ("BMP", None, "bmp"), ("GIF", None, "gif"), ("PNG", "L", "png"), ("PNG", "RGBA", "png")]
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            base = np.clip(rng.normal(60 + 120 * c, 30, (size, size + i, 3)), 0, 255).astype(np.uint8)
            fmt, mode, ext = kinds[i % len(kinds)]
            with open(os.path.join(root, name, f"{i:03d}.{ext}"), "wb") as f:
                f.write(_encode(base, fmt, mode))


def write_splits(root, train=12, test=4, classes=("cat", "dog", "owl")):
    """root/train/<class>/ and root/test/<class>/ with `train` and `test` images per class."""
    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        write_class_folder(os.path.join(root, split), classes=classes, per_class=n, seed=seed)
    return str(root)


def run_cli(*args):
    """`tfxfer ARGS` in-process, in a fresh Keras session; a click `Result`."""
    from click.testing import CliRunner

    from tfxfer.cli import main

    keras.backend.clear_session(free_memory=False)
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def image_folder(tmp_path):
    """A single class folder with every image kind, one corrupt JPEG and one text file."""
    root = tmp_path / "images"
    write_class_folder(str(root), per_class=12)
    (root / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "dog" / "notes.txt").write_text("not an image")
    return str(root)


@pytest.fixture
def tiny_model_factory():
    def make(**kwargs):
        kwargs.setdefault("weights", None)
        kwargs.setdefault("num_classes", 3)
        kwargs.setdefault("image_size", 32)
        return tfxfer.build_model("tiny", **kwargs)

    return make


@pytest.fixture
def offline_keras(monkeypatch):
    """Keras's weight downloads fail as they do without a network."""

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -2] Name or service not known")

    for module in ("keras.src.utils.file_utils", "keras.src.applications.resnet.file_utils"):
        monkeypatch.setattr(module + ".get_file", offline)


@contextlib.contextmanager
def read_only(folder, monkeypatch):
    """`folder` as the user who cannot write it sees it: a read-only bind mount
    where the test may mount (root has no other way to be refused a write),
    else no write permission, else every tfxfer write failing with EROFS."""
    try:
        mounted = os.geteuid() == 0 and subprocess.run(
            ["mount", "--bind", "-o", "ro", folder, folder], capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    try:
        if not mounted and os.geteuid() != 0:
            for root, _, _ in os.walk(folder):
                os.chmod(root, 0o555)
        elif not mounted:
            from tfxfer import atomic

            write_text = atomic.write_text

            def refuse_inside(path, text):
                if os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
                write_text(path, text)

            monkeypatch.setattr(atomic, "write_text", refuse_inside)
        yield
    finally:
        if mounted:
            subprocess.run(["umount", folder], check=True)
        elif os.geteuid() != 0:
            for root, _, _ in os.walk(folder):
                os.chmod(root, 0o755)


def serve(run_dir, images, export="1"):
    """Probabilities of `images` (uint8, N×S×S×3) from the run's export `export`, run by the format's own runtime:
    TensorFlow for a SavedModel version, onnxruntime for `onnx`, the LiteRT interpreter for `litert*`."""
    folder = os.path.join(str(run_dir), "export", export)
    if export.startswith("onnx"):
        import onnxruntime

        session = onnxruntime.InferenceSession(os.path.join(folder, "model.onnx"))
        return session.run(None, {session.get_inputs()[0].name: images})[0]
    if export.startswith("litert"):
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=os.path.join(folder, "model.tflite"))
        entry = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(entry["index"], images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(entry["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    import tensorflow as tf

    served = tf.saved_model.load(folder).signatures["serving_default"]
    return served(images=tf.constant(images))["probabilities"].numpy()


def split_images(data_dir, split, size):
    """`(images, class ids)` of a write_splits folder's split, decoded and resized as training does."""
    from tfxfer.data.images import decode_image, resize_uint8

    classes = sorted(os.listdir(os.path.join(str(data_dir), split)))
    files = [(c, os.path.join(str(data_dir), split, name, f)) for c, name in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(str(data_dir), split, name)))]
    images = np.stack([resize_uint8(decode_image(open(f, "rb").read()), size).numpy() for _, f in files])
    return images, np.array([c for c, _ in files])


# Work shared by the whole run. Each is made once, on first use; a test that writes
# copies it (`run_copy`) and a test that only reads uses it as it is: each fixture
# checks at the end of the run that nothing in it changed.
def _snapshot(folder):
    return {os.path.relpath(os.path.join(d, f), folder): (os.path.getsize(os.path.join(d, f)),
                                                          os.path.getmtime(os.path.join(d, f)))
            for d, _, files in os.walk(folder) for f in files}


@contextlib.contextmanager
def _unchanged(folder):
    before = _snapshot(folder)
    yield
    assert _snapshot(folder) == before, f"a test wrote into the shared {folder}; copy it first (run_copy)"


def _once(tmp_path_factory, name, build):
    """The folder `name`, made by `build(folder)` once per test run, however many xdist
    workers ask for it: the first builds it under a file lock and the others wait for it
    and reuse it (pytest-xdist's recipe for session fixtures). Returns the folder."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # shared by one run's workers
    folder, done = root / f"once-{name}", root / f"once-{name}.done"
    with FileLock(str(root / f"once-{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.write_text("built")
    return folder


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory):
    """A write_splits folder: cat, dog and owl, 12 train and 4 test images each, one colour per class."""
    folder = _once(tmp_path_factory, "shared", lambda root: write_splits(root / "data", train=12, test=4)) / "data"
    with _unchanged(folder):
        yield folder


SHARED_RUN = ["--backbone", "resnet9", "--weights", "none", "--image-size", "32", "--epochs", "5", "--batch-size", "8",
              "--lr", "0.01", "--train-bn", "--seed", "0", "--precision", "float32"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, shared_data):
    """A finished `finetune` of resnet9 on `shared_data` (options SHARED_RUN) that learned its classes:
    its run folder, with model.keras, metrics.json, the plots and the SavedModel export/1."""
    def build(root):
        result = run_cli("finetune", "--data-dir", shared_data, *SHARED_RUN, "--output-dir", root, "--run-name", "r")
        assert result.exit_code == 0, result.output

    root = _once(tmp_path_factory, "finished", build)
    with _unchanged(root / "r"):
        yield root / "r"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of `finished_run` at tmp_path/runs/r, for a test that writes into a run."""
    copy = tmp_path / "runs" / "r"
    shutil.copytree(finished_run, copy)
    return copy


# bfloat16 is native on some CPUs (AVX512-BF16, AMX) and emulated, slowly, on others: there the tests that
# force it join the slow tier; where it is native they stay in the inner loop.
def _bfloat16_mark():
    from tfxfer.runtime import has_bf16

    return pytest.mark.usefixtures() if has_bf16() else pytest.mark.slow


bfloat16 = _bfloat16_mark()


def _auto_is_float32():
    """`--precision auto` resolves by the CPU (bfloat16 where it is native). The suite pins it to float32,
    so that a test means the same on every CPU; the tests about bfloat16 force it, and the resolution
    itself is tested with the CPU flags given explicitly."""
    from tfxfer import runtime

    native = runtime.has_bf16

    def has_bf16(flags=None, gpu_capabilities=None):
        return False if flags is None and gpu_capabilities is None else native(flags, gpu_capabilities)

    runtime.has_bf16 = has_bf16


_auto_is_float32()


@pytest.fixture(scope="session")
def pretrained_backbone(tmp_path_factory):
    """`(run folder, its data)`: a finished supervised `pretrain` of simplecnn, one epoch, on a class folder
    of ant, bee, cat and dog (12 images each)."""
    import tfxfer
    from tfxfer.config import PretrainConfig, load_config

    def build(root):
        write_class_folder(str(root / "source"), classes=("ant", "bee", "cat", "dog"), per_class=12)
        config = load_config(kind=PretrainConfig, data_dir=str(root / "source"), backbone="simplecnn", epochs=1,
                             batch_size=8, output_dir=str(root / "runs"), run_name="p")
        tfxfer.pretrain(config, verbose=0, log=lambda *_: None)
        keras.backend.clear_session(free_memory=False)

    root = _once(tmp_path_factory, "pretrained", build)
    run_dir, source = str(root / "runs" / "p"), str(root / "source")
    with _unchanged(run_dir):
        yield run_dir, source


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory, shared_data):
    """`(study folder, its output)`: a finished `study` of the tiny backbone on `shared_data`, strategies scratch and
    full, seeds 0 and 1, one epoch each."""
    def build(root):
        result = run_cli("study", "--data-dir", shared_data, "--backbone", "tiny", "--weights", "none", "--image-size",
                         "32", "--epochs", "1", "--batch-size", "8", "--lr", "0.01", "--strategies", "scratch,full",
                         "--seeds", "0,1", "--output-dir", root / "out", "--name", "s")
        assert result.exit_code == 0, result.output
        (root / "output.txt").write_text(result.output)

    root = _once(tmp_path_factory, "study", build)
    with _unchanged(root / "out" / "s"):
        yield root / "out" / "s", (root / "output.txt").read_text()
