"""Write `cifar-10-binary.tar.gz` in the real CIFAR-10 binary format, from
generated images, for tests and for trying the offline `--dataset cifar10` route:

    python -m tests.cifar_archive FOLDER [--per-class N] [-- TFXFER ARGUMENTS...]

With arguments after `--`, it then runs `tfxfer` with them in the same
process, where tfds's `cifar10` builder is told this archive's checksum
(`register`): the real archive's checksum is what tfds checks otherwise.

Each record is one label byte and 3,072 pixel bytes (the red plane, then green,
then blue, 32x32 each), in `cifar-10-batches-bin/data_batch_1..5.bin` and
`test_batch.bin`, with the class names in `batches.meta.txt`, as the original.
Each class gets its own mean colour and a bright square in its own place, so a
network learns it in an epoch.
"""

import argparse
import hashlib
import io
import os
import tarfile

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ARCHIVE = "cifar-10-binary.tar.gz"


def _records(per_class, rng):
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    out = bytearray()
    for label in labels:
        image = rng.normal(25 * label, 20, (32, 32, 3))
        y, x = divmod(int(label), 5)
        image[4 + 12 * y:14 + 12 * y, 2 + 6 * x:8 + 6 * x] = 255
        planes = np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1)  # HWC -> the three colour planes
        out += bytes([int(label)]) + planes.tobytes()
    return bytes(out)


def write_archive(folder, per_class=10, test_per_class=10, seed=0):
    """Write the archive into `folder`; returns `(path, size in bytes, SHA-256)`."""
    rng = np.random.default_rng(seed)
    members = {f"data_batch_{i}.bin": _records(per_class, rng) for i in range(1, 6)}
    members["test_batch.bin"] = _records(test_per_class, rng)
    members["batches.meta.txt"] = ("\n".join(CLASSES) + "\n\n").encode()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ARCHIVE)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return path, os.path.getsize(path), digest


def register(path, size, digest):
    """Make tfds's `cifar10` builder accept this archive, in this process only:
    its registered checksum is the real archive's."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import checksums

    url = next(iter(tfds.builder_cls("cifar10").url_infos))
    tfds.builder_cls("cifar10").url_infos = {url: checksums.UrlInfo(size=size, checksum=digest, filename=ARCHIVE)}


if __name__ == "__main__":
    import sys

    argv = sys.argv[1:]
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--per-class", type=int, default=10, help="training images per class in each of the 5 batches")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    written = write_archive(args.folder, args.per_class)
    print("wrote {} ({} bytes, SHA-256 {})".format(*written))
    if rest:
        from tfxfer.cli import main

        register(*written)
        main(rest)
