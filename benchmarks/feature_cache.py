"""Feature caching: a head-only epoch through the backbone against one on cached features.

tfxfer's ResNet50 (random init, `freeze="head"`), `--size` px, batch `--batch-size`,
`--images` random uint8 images. Measured in one process: two epochs through the
backbone (the second is timed), the feature extraction (what the first cached
epoch costs on top), and `--epochs` epochs of the head on the cache (all but the
first timed, median). Also checks that cached and uncached logits agree.

    python -m benchmarks feature-cache                 # 224 px, batch 16, 256 images
Writes benchmarks/feature_cache.md (or --out).
"""

import argparse
import os
import statistics
import time

from benchmarks.harness import ROOT, quiet_tensorflow, stamp, write_report


def main(argv, prog="python -m benchmarks feature-cache"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "feature_cache.md"))
    args = parser.parse_args(argv)

    quiet_tensorflow()
    import tfxfer
    import keras
    import numpy as np
    import tensorflow as tf

    from tfxfer.feature_cache import HeadModel, extract_features, feature_dataset

    keras.utils.set_random_seed(0)
    model = tfxfer.build_model(args.backbone, num_classes=10, weights=None, image_size=args.size, freeze="head")
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.size, args.size, 3), np.uint8)
    labels = (np.arange(args.images) % 10).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(args.batch_size).cache()

    def timed_epochs(fit_model, dataset, epochs):
        times = []
        clock = keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda e, logs: times.append(-time.perf_counter()),
            on_epoch_end=lambda e, logs: times.__setitem__(-1, times[-1] + time.perf_counter()),
        )
        fit_model.fit(dataset, epochs=epochs, callbacks=[clock], verbose=0)
        return times

    uncached = timed_epochs(model, data, 2)[1]
    start = time.perf_counter()
    features, cached_labels = extract_features(model, data)
    extraction = time.perf_counter() - start
    head = HeadModel(model)
    head.compile(optimizer=model.optimizer, loss="sparse_categorical_crossentropy")
    cached = statistics.median(timed_epochs(head, feature_dataset(features, cached_labels, args.batch_size, True, 0), args.epochs)[1:])
    difference = float(np.abs(head.predict(features[:64], verbose=0) - model.predict(images[:64], verbose=0)).max())

    rows = [
        ("epoch through the backbone (2nd epoch)", f"{uncached:.2f} s", f"{args.images / uncached:.1f} img/s"),
        ("feature extraction (once)", f"{extraction:.2f} s", f"{args.images / extraction:.1f} img/s"),
        (f"epoch on cached features (median of {args.epochs - 1})", f"{cached * 1000:.1f} ms", f"{args.images / cached:,.0f} img/s"),
    ]
    lines = [
        "# Feature caching (`freeze=head`)", "",
        *stamp(f"{prog} {' '.join(argv)}".strip()),
        f"{args.backbone}, {args.size} px, batch {args.batch_size}, {args.images} images, float32.", "",
        "| what | time | throughput |", "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows], "",
        f"**Epochs after the first: {uncached / cached:,.0f}× faster on the cache.** The first epoch costs the "
        f"extraction plus one cached epoch ({(extraction + cached) / uncached:.2f}× an uncached epoch).", "",
        f"Cached vs uncached probabilities, max |difference| over 64 images: {difference:.1e}.", "",
    ]
    write_report(args.out, lines)

