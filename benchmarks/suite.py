"""The benchmark suite: tfxfer's training step against plain Keras `fit` and the
classic PyTorch eager loop, the input pipeline, peak memory and FLOP/s.

    pip install -e '.[bench]'          # adds torch (optional)
    python -m benchmarks suite         # writes BENCHMARKS.md

Every contender trains the same ResNet50 (random init, 10-class head, SGD with
momentum 0.9, BatchNorm frozen per layer, which is tfxfer's default), on the same
random uint8 batch, in its own process. Contenders alternate within each
repeat, so a machine that slows down slows all of them; each figure is the
median over repeats of (batch size / median step time) after warm-up steps.

The L2-SP overhead and the gain of the CPU speed-ups are measured apart, in
one process that holds the models (`benchmarks/paired.py`): across processes
the same step varies by more than either.

Contenders:
    tfxfer head / full / full+L2-SP   tfxfer.build_model + compile(Keras's SGD) + fit, speed-ups applied
    keras fit                          keras.applications.ResNet50 + Dense, compile(Keras's SGD) + fit
    torch eager full / full+L2-SP      the plain loop: zero_grad, forward, loss, backward, step
"""

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

from benchmarks.harness import ROOT, child_result, quiet_tensorflow, run_child, stamp, write_report

CONTENDERS = ("tfxfer head", "tfxfer full", "tfxfer full+L2-SP", "keras fit full", "torch eager full", "torch eager full+L2-SP")
SETTINGS = ((32, 64, 15), (224, 16, 5))  # (image size, batch, timed steps)
WARMUP = 3


def has_bf16(flags):
    return bool({"avx512_bf16", "amx_bf16"} & flags)


# --- child processes ---------------------------------------------------------------------------


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _keras_rate(model, size, batch, steps):
    import keras
    import numpy as np
    import tensorflow as tf

    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8)
    labels = np.arange(batch) % 10
    data = tf.data.Dataset.from_tensors((images, labels)).repeat().take(steps + WARMUP).cache()
    ends = []
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: ends.append(time.perf_counter()))
    model.fit(data, epochs=1, callbacks=[clock], verbose=0)
    return batch / statistics.median([b - a for a, b in zip(ends[WARMUP - 1:], ends[WARMUP:])])


def child_step(contender, size, batch, steps, precision, train_bn=False):
    quiet_tensorflow()
    if contender.startswith("torch"):
        return _torch_step(contender, size, batch, steps, precision, train_bn)
    import tfxfer  # oneDNN on, as tfxfer users get it
    import keras

    if precision != "float32":
        keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    if contender.startswith("tfxfer"):
        backbone = os.environ.get("BENCH_BACKBONE", "resnet50")
        freeze = "head" if contender.endswith("head") else "full"
        model = tfxfer.build_model(backbone, num_classes=10, weights=None, image_size=size, freeze=freeze,
                                   l2sp=0.01 if "L2-SP" in contender else 0.0, train_bn=train_bn)
    else:
        inputs = keras.Input((size, size, 3), dtype="uint8")
        x = keras.layers.Lambda(lambda t: keras.ops.cast(t, "float32") - 127.5)(inputs)
        base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        outputs = keras.layers.Dense(10, activation="softmax", dtype="float32")(base(x))
        model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.001, momentum=0.9), "sparse_categorical_crossentropy")
    if contender.startswith("tfxfer"):  # the speed-ups `tfxfer finetune` applies for training
        from tfxfer import speedups

        with speedups.applied(model, log=lambda line: None):
            rate = _keras_rate(model, size, batch, steps)
    else:
        rate = _keras_rate(model, size, batch, steps)
    return {"images_per_second": rate, "peak_mb": _peak_mb(), "forward_flops": forward_flops(model)}


def _torch_step(contender, size, batch, steps, precision, train_bn=False):
    from benchmarks.torch_resnet import training_step

    step = training_step(size, batch, precision, l2sp=0.01 if "L2-SP" in contender else 0.0, train_bn=train_bn)
    times = []
    for _ in range(steps + WARMUP):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"images_per_second": batch / statistics.median(times[WARMUP:]), "peak_mb": _peak_mb()}


def forward_flops(model):
    """Multiply-adds x 2 of the convolutions and dense layers of a Keras model."""
    import keras

    total = 0
    stack = [model]
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.Model):
            stack.extend(layer.layers)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            out = layer.output.shape
            kernel = layer.kernel.shape
            total += 2 * out[1] * out[2] * int(__import__("numpy").prod(kernel))
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * int(layer.kernel.shape[0]) * int(layer.kernel.shape[1])
    return total


def child_matmul(dtype="float32"):
    """Measured matmul peak of TensorFlow on this CPU in `dtype`, in FLOP/s."""
    quiet_tensorflow()
    import tfxfer  # noqa: F401
    import tensorflow as tf

    n = 2048
    a, b = tf.random.normal((n, n), dtype=dtype), tf.random.normal((n, n), dtype=dtype)
    step = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    step()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        step().numpy()
        times.append(time.perf_counter() - start)
    return {"flops": 2 * n ** 3 / min(times)}


def child_pipeline(size, batch, folder):
    """tfxfer's image-folder pipeline alone: read, decode, resize, cache-free, flip+crop, batch."""
    quiet_tensorflow()
    import tfxfer

    train, _, _, info = tfxfer.load_dataset(data_dir=folder, image_size=size, batch_size=batch, augment="flip_crop",
                                            cache=False)
    count, start = 0, None
    for i, (images, _) in enumerate(train):
        if i == 2:
            start, count = time.perf_counter(), 0
        count += int(images.shape[0])
    return {"images_per_second": count / (time.perf_counter() - start), "images": info.num_examples["train"]}


def child(args):
    if args.child == "step":
        result = child_step(args.contender, args.size, args.batch, args.steps, args.precision, args.train_bn)
    elif args.child == "matmul":
        result = child_matmul(args.dtype)
    else:
        result = child_pipeline(args.size, args.batch, args.folder)
    child_result(result)


# --- the driver ---------------------------------------------------------------------------------


def jpeg_folder(root, count=2000):
    """A folder of `count` generated 32 px JPEGs in 10 classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
    for i in range(count):
        image = np.clip(rng.normal(120, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(root, f"class{i % 10}", f"{i}.jpg"), quality=90)
    return root


def main(argv, prog="python -m benchmarks suite"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--contender")
    parser.add_argument("--size", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--folder")
    parser.add_argument("--train-bn", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    from tfxfer.runtime import cpu_flags

    flags = cpu_flags()
    try:
        import torch  # noqa: F401
        contenders = CONTENDERS
    except ImportError:
        print("torch is not installed (pip install -e '.[bench]'); measuring without PyTorch", flush=True)
        contenders = tuple(c for c in CONTENDERS if not c.startswith("torch"))
    precisions = ("float32", "mixed_bfloat16") if has_bf16(flags) else ("float32",)
    started = time.time()
    peak = run_child("suite", "matmul")["flops"]
    results = {}
    for size, batch, steps in SETTINGS:
        for precision in precisions:
            for repeat in range(args.repeats):
                order = contenders if repeat % 2 == 0 else tuple(reversed(contenders))
                for contender in order:
                    r = run_child("suite", "step", "--contender", contender, "--size", str(size), "--batch", str(batch),
                                  "--steps", str(steps), "--precision", precision)
                    results.setdefault((size, batch, precision, contender), []).append(r)
                    print(size, precision, contender, round(r["images_per_second"], 1), flush=True)
    pairs = ",".join(f"{size}:{batch}" for size, batch, _ in SETTINGS)
    overhead = {precision: run_child("paired", "--sizes", pairs, "--precision", precision) for precision in precisions}
    small = {}
    for backbone, batch in (("resnet9", 128), ("simplecnn", 128)):
        runs = [run_child("suite", "step", "--contender", "tfxfer full", "--size", "32", "--batch", str(batch), "--steps", "20",
                          env={"BENCH_BACKBONE": backbone}) for _ in range(args.repeats)]
        small[backbone] = (batch, runs)
    with tempfile.TemporaryDirectory() as folder:
        jpeg_folder(folder)
        pipeline = {size: run_child("suite", "pipeline", "--size", str(size), "--batch", str(batch), "--folder", folder)
                    for size, batch, _ in SETTINGS}
    command = f"{prog} {' '.join(argv)}".strip()
    write(args.out, command, peak, results, small, pipeline, overhead, contenders, precisions, args.repeats,
          time.time() - started)
    # After the table, whose stamp would count this file as a change to the checkout.
    with open(os.path.join(ROOT, "benchmarks", "suite.json"), "w") as f:  # the raw measurements of the table
        json.dump({"peak": peak, "pipeline": pipeline, "small": small, "overhead": overhead,
                   "results": [[list(k), v] for k, v in results.items()]}, f, indent=1)


def write(path, command, peak, results, small, pipeline, overhead, contenders, precisions, repeats, seconds):
    def rate(key):
        return statistics.median(r["images_per_second"] for r in results[key])

    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    lines = [
        "# Benchmarks", "",
        *stamp(command),
        f"PyTorch {torch_version}. {repeats} repeats, contenders alternating, {seconds / 60:.0f} min. Each figure: images/s = batch / median step time after "
        f"{WARMUP} warm-up steps, median over repeats; peak memory is the process's maximum resident set.", "",
        "ResNet50, random init, 10-class head, SGD momentum 0.9, BatchNorm frozen per layer (tfxfer's default) on every "
        "side, L2-SP α = 0.01 over the backbone's kernels.", "",
    ]
    if "mixed_bfloat16" not in precisions:
        lines += ["No bf16 rows: this CPU has neither AVX512-BF16 nor AMX, so bfloat16 would be emulated "
                  "(`--precision auto` picks float32 here).", ""]
    for size, batch, _ in SETTINGS:
        for precision in precisions:
            torch_key = (size, batch, precision, "torch eager full+L2-SP")
            keras_key = (size, batch, precision, "keras fit full")
            lines += [f"## {size} px, batch {batch}, {precision}", "",
                      "| contender | img/s | peak MB | tfxfer full+L2-SP / this | achieved FLOP/s (share of matmul peak) |",
                      "|---|---|---|---|---|"]
            mine = rate((size, batch, precision, "tfxfer full+L2-SP"))
            flops = next((r["forward_flops"] for r in results[(size, batch, precision, "tfxfer full")]), None)
            for contender in contenders:
                key = (size, batch, precision, contender)
                r = rate(key)
                memory = max(x["peak_mb"] for x in results[key])
                train_flops = flops * (1 if contender.endswith("head") else 3) if flops else None
                # forward_flops is per image: FLOP/s = FLOPs per image x images per second.
                achieved = f"{train_flops * r / 1e9:.0f} GFLOP/s ({train_flops * r / peak:.0%})" if train_flops else "–"
                lines.append(f"| {contender} | {r:.1f} | {memory:,.0f} | {mine / r:.2f} | {achieved} |")
            lines.append("")
            across = rate((size, batch, precision, "tfxfer full")) / mine
            measured = overhead[precision][str(size)]
            rounds = len(measured["seconds"]["full"])
            gain = (f"the CPU speed-ups make the full+L2-SP step **{measured['speedups']:.2f}×** as fast as Keras's own "
                    "convolutions" if measured["speedups"] else "no convolution is small enough to reroute")
            cost = (f"**L2-SP overhead: {100 * measured['l2sp']:+.1f}%** (tfxfer full+L2-SP against full in one process, "
                    f"median of the ratio over {rounds} alternating rounds; across the separate processes above: "
                    f"{100 * (across - 1):+.1f}%); in the same process, {gain}. ")
            lines.append(cost
                         + (f"tfxfer / PyTorch (full+L2-SP): **{mine / rate(torch_key):.2f}×**. " if torch_key in results else "")
                         + f"tfxfer / plain Keras (full+L2-SP vs full): {mine / rate(keras_key):.2f}×.")
            lines.append("")
    lines += [f"Measured matmul peak (TensorFlow, 2048² fp32; the bfloat16 rows' shares are of the same float32 peak): "
              f"{peak / 1e9:.0f} GFLOP/s. Training FLOPs are taken as "
              "3× the forward pass's (2 × multiply-adds of convolutions and dense layers); for `head`, 1× (no "
              "backward through the backbone).", "",
              "## Input pipeline", "",
              "tfxfer's image-folder pipeline alone (2,000 32 px JPEGs: read, decode, resize, flip + pad-and-crop, "
              "batch; no cache), against what the full + L2-SP step consumes:", "",
              "| size | pipeline img/s | step img/s | pipeline / step |", "|---|---|---|---|"]
    for size, batch, _ in SETTINGS:
        step = rate((size, batch, "float32", "tfxfer full+L2-SP"))
        p = pipeline[size]["images_per_second"]
        lines.append(f"| {size} px | {p:,.0f} | {step:.1f} | {p / step:,.0f}× |")
    lines += ["", "## Small backbones (tfxfer full, 32 px, fp32)", "", "| backbone | batch | img/s | peak MB |", "|---|---|---|---|"]
    for backbone, (batch, runs) in small.items():
        lines.append(f"| {backbone} | {batch} | {statistics.median(r['images_per_second'] for r in runs):.1f} | "
                     f"{max(r['peak_mb'] for r in runs):,.0f} |")
    lines.append("")
    write_report(path, lines)
