"""Training throughput of tfxfer's step against plain Keras `fit`, in one run.

Every case trains a random-init ResNet50 with a 10-class head, SGD with momentum,
on a cached `tf.data` of random uint8 images, and counts whole training steps after
warm-up, as batch size over the median step time. Cases alternate between plain
Keras and tfxfer, and each pair is reported as a ratio of medians, since absolute
timings on a shared CPU drift by up to 2x. (A first version timed whole `fit`
calls of 10 steps; on the 2-core machine many of those came out at exactly
125 img/s for either side, a stall of the call, not of the steps: train_on_batch
of the same model ran at ~280 ms a step, 230 img/s.)

    python benchmarks/train_step.py                 # 32 px cases, a few minutes
    python benchmarks/train_step.py --size 224 --batch-size 16 --steps 6
Writes benchmarks/train_step.md (or --out).
"""

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfxfer  # noqa: E402


def plain_keras(size, freeze_bn, backbone_frozen):
    """The Keras transfer-learning guide's model, preprocessing inside."""
    inputs = keras.Input((size, size, 3), dtype="uint8")
    x = keras.applications.resnet.preprocess_input(keras.ops.cast(inputs, "float32"))
    backbone = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(size, size, 3))
    backbone.trainable = not backbone_frozen
    if freeze_bn:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    x = keras.layers.GlobalAveragePooling2D()(backbone(x))
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", dtype="float32")(x))


def tfxfer_model(size, freeze_bn, backbone_frozen, l2sp):
    return tfxfer.build_model(
        "resnet50", num_classes=10, weights=None, image_size=size,
        freeze="head" if backbone_frozen else "full", train_bn=not freeze_bn, l2sp=l2sp,
    )


class StepTimes(keras.callbacks.Callback):
    """Wall time of each training step, from one step's end to the next's."""

    def on_train_begin(self, logs=None):
        self.ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


def images_per_second(model, size, batch_size, steps):
    """Batch size over the median step time: whole steps, after warm-up, robust
    to the occasional stall of a shared CPU."""
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch_size * steps, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, batch_size * steps)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache()
    model.fit(data, epochs=1, verbose=0)  # trace, warm up, fill the cache
    timer = StepTimes()
    model.fit(data, epochs=1, verbose=0, callbacks=[timer])
    return batch_size / float(np.median(np.diff(timer.ends)))


CASES = [
    # (label, bf16, BN frozen, backbone frozen, L2-SP alpha for tfxfer)
    ("full, fp32, BN training", False, False, False, 0.0),
    ("full, fp32, BN frozen", False, True, False, 0.0),
    ("full, fp32, BN frozen, L2-SP 0.01", False, True, False, 0.01),
    ("full, bf16, BN frozen", True, True, False, 0.0),
    ("backbone frozen, fp32", False, True, True, 0.0),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements per case")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "train_step.md"))
    args = parser.parse_args()

    rows, raw = [], []
    for label, bf16, freeze_bn, backbone_frozen, l2sp in CASES:
        plain, ours = [], []
        for _ in range(args.repeats):
            for builder, results in ((lambda: plain_keras(args.size, freeze_bn, backbone_frozen), plain),
                                     (lambda: tfxfer_model(args.size, freeze_bn, backbone_frozen, l2sp), ours)):
                keras.backend.clear_session()
                keras.mixed_precision.set_global_policy("mixed_bfloat16" if bf16 else "float32")
                results.append(images_per_second(builder(), args.size, args.batch_size, args.steps))
        keras.mixed_precision.set_global_policy("float32")
        rows.append((label, np.median(plain), np.median(ours)))
        raw.append((label, plain, ours))
        print(f"{label}: plain Keras {rows[-1][1]:.1f} img/s, tfxfer {rows[-1][2]:.1f} img/s", flush=True)

    lines = [
        f"# Training throughput: tfxfer vs plain Keras ({args.size} px, batch {args.batch_size})",
        "",
        f"Random-init ResNet50, 10-class head, SGD momentum 0.9; median of {args.repeats} alternating "
        f"measurements, each batch size / median time of {args.steps} steps after a warm-up epoch. TF {tf.__version__}, Keras {keras.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores.",
        f"Command: `python benchmarks/train_step.py --size {args.size} --batch-size {args.batch_size} --steps {args.steps}`",
        "",
        "| case | plain Keras fit (img/s) | tfxfer fit (img/s) | tfxfer / Keras |",
        "|---|---|---|---|",
    ]
    lines += [f"| {label} | {p:.1f} | {o:.1f} | {o / p:.2f} |" for label, p, o in rows]
    lines += ["", "All measurements (img/s), in order: " + "; ".join(
        f"{label}: Keras {', '.join(f'{v:.0f}' for v in p)} / tfxfer {', '.join(f'{v:.0f}' for v in o)}"
        for label, p, o in raw)]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
