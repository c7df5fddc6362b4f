import contextlib
import errno
import io
import os
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
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")


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

    keras.backend.clear_session()
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
