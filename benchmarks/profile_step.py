"""Where tfxfer's training step spends its time, from TensorFlow's profiler.

Random-init ResNet50, full fine-tune (BatchNorm frozen) + L2-SP, tfxfer's SGD,
float32, on cached random uint8 images. Profiles `--steps` steps after warm-up
and sums the time of every TensorFlow op by kind. TensorFlow runs up to two
ops at once here (its executor has a thread per core), so op time adds up to
more than the wall time; the shares say what the cores were busy with.

    python -m benchmarks profile                       # 32 px, batch 64
    python -m benchmarks profile --size 224 --batch-size 16 --steps 3
Writes benchmarks/profile_step-<size>px.md (or --out).
"""

import argparse
import collections
import glob
import os
import tempfile

from benchmarks.harness import ROOT, median_step_seconds, quiet_tensorflow, random_batches, stamp, write_report

# (kind, test on the op's type and name), first match wins.
KINDS = (
    ("convolution, kernel gradient (oneDNN)", lambda t, n: t.startswith("_MklNativeConv2DBackpropFilter")),
    ("convolution, input gradient (oneDNN)", lambda t, n: "Conv2DBackpropInput" in t),
    ("convolution, forward (oneDNN)", lambda t, n: "Conv2D" in t),
    ("matrix products (1x1 convolutions, patch gradients, head)", lambda t, n: "MatMul" in t),
    ("image patches (patch gradients)", lambda t, n: t == "ExtractImagePatches"),
    ("optimizer update", lambda t, n: t.startswith("ResourceApply") or "/sgd/" in n),
    ("L2-SP: w - w0, its square sum and gradient", lambda t, n: "L2Loss" in n or (t == "Sub" and "transfer_model" not in n)),
    ("gradient sums (AddN)", lambda t, n: t == "AddN" and "gradient_tape" not in n and "transfer_model" not in n),
    ("BatchNorm, ReLU, pooling, loss, other", lambda t, n: True),
)


def main(argv, prog="python -m benchmarks profile"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(ROOT, "benchmarks", f"profile_step-{args.size}px.md")

    quiet_tensorflow()
    import tfxfer
    import keras
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2


    keras.utils.set_random_seed(0)
    batches = iter(random_batches(args.size, args.batch_size))
    model = tfxfer.build_model("resnet50", num_classes=10, weights=None, image_size=args.size, freeze="full", l2sp=0.01)
    model.compile(tfxfer.optim.make_optimizer("sgd", 0.001), "sparse_categorical_crossentropy")
    model.make_train_function()
    step_seconds = median_step_seconds(model, batches, args.steps, warmup=3)

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(args.steps):
            float(model.train_function(batches)["loss"])
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())

    per_kind, example = collections.Counter(), {}
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                label = plane.event_metadata[event.metadata_id].name
                if ":" not in label or "::" in label:  # not an op: the executor's own events
                    continue
                name, op_type = label.rsplit(":", 1)
                if op_type in ("StatefulPartitionedCall", "PartitionedCall"):
                    continue
                kind = next(k for k, test in KINDS if test(op_type, name))
                per_kind[kind] += event.duration_ps / 1e9 / args.steps
                example.setdefault(kind, collections.Counter())[op_type] += event.duration_ps
    total = sum(per_kind.values())
    step_ms = 1000 * step_seconds
    lines = [
        f"# Where the training step's time goes: ResNet50, {args.size} px, batch {args.batch_size}", "",
        *stamp(f"{prog} {' '.join(argv)}".strip()),
        f"Full fine-tune (BatchNorm frozen) + L2-SP 0.01, tfxfer's SGD, float32. Step: **{step_ms:.0f} ms** "
        f"({args.batch_size / step_seconds:.1f} img/s, median of {args.steps}, without the profiler). "
        f"Op time: {total:.0f} ms per step, summed over TensorFlow's executor threads (ops overlap).", "",
        "| kind of op | ms per step | share of op time | largest op types |", "|---|---|---|---|",
        *[f"| {kind} | {per_kind[kind]:.1f} | {per_kind[kind] / total:.1%} | "
          f"{', '.join(f'`{t}`' for t, _ in example[kind].most_common(3))} |"
          for kind, _ in KINDS if kind in per_kind],
    ]
    write_report(out, lines)

