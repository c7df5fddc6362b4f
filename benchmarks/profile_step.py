"""Where the training step spends its time: TensorFlow's profiler on tfxfer's step, torch.profiler on PyTorch's.

ResNet50 (or `--backbone vit_b16|convnext_tiny`) from random weights, full
fine-tune with BatchNorm frozen, L2-SP `--l2sp` (0.01), SGD with momentum, on
cached random uint8 images, in `--precision`. The tfxfer step is the one
`tfxfer finetune` runs (the CPU speed-ups applied); the PyTorch step is the
suite's eager loop (channels-last input, `torch.autocast` for bfloat16), over
timm's model of the same architecture for the other backbones (run in the
`families` benchmark's timm environment). Each profiles `--steps` steps after warm-up and sums op time by
kind. TensorFlow runs up to two ops at once here (its executor has a thread per
core), so op time adds up to more than the wall time; the shares say what the
cores were busy with.

    python -m benchmarks profile                                   # 32 px, batch 64, float32
    python -m benchmarks profile --size 224 --batch-size 16 --steps 3 --precision mixed_bfloat16
    python -m benchmarks profile --backbone vit_b16 --l2sp 0 --size 224 --batch-size 16 --steps 3
Writes benchmarks/profile-[<backbone>-]<size>px-<precision>.md (or --out).
"""

import argparse
import collections
import glob
import os
import tempfile
import time

from benchmarks.harness import ROOT, child_result, median_step_seconds, quiet_tensorflow, random_batches, run_child, stamp, write_report

# (kind, test on the op's type and name), first match wins.
KINDS = (
    ("convolution, kernel gradient", lambda t, n: "Conv2DBackpropFilter" in t),
    ("convolution, input gradient", lambda t, n: "Conv2DBackpropInput" in t),
    ("convolution, forward", lambda t, n: "Conv2D" in t),
    ("matrix products (rerouted 1x1 convolutions, patch gradients, head)", lambda t, n: "MatMul" in t),
    ("image patches (patch gradients)", lambda t, n: t == "ExtractImagePatches"),
    ("casts", lambda t, n: t == "Cast"),
    ("layout: transposes and reorders", lambda t, n: "Transpose" in t or "Reorder" in t or "ToTf" in t),
    ("L2-SP: w - w0, its square sum and gradient", lambda t, n: "l2sp" in n.lower() or t == "L2Loss"),
    ("optimizer update", lambda t, n: t.startswith("ResourceApply") or "/sgd/" in n.lower()
     or t in ("AssignSubVariableOp", "AssignAddVariableOp", "AssignVariableOp")),
    ("BatchNorm (frozen: scale and shift, and their gradients)", lambda t, n: "FusedBatchNorm" in t or "_bn" in n
     or "batchnorm" in n.lower()),
    ("softmax (attention)", lambda t, n: "Softmax" in t),
    ("GELU (erf, erfc)", lambda t, n: t in ("Erf", "Erfc") or "gelu" in n.lower()),
    ("LayerNorm: moments, normalization and their gradients", lambda t, n: "layer_norm" in n.lower()
     or "layernorm" in n.lower() or "/ln" in n.lower() or "norm" in n.lower() and t in ("Mean", "Rsqrt")),
    ("ReLU, additions and other elementwise ops", lambda t, n: t in (
        "Relu", "ReluGrad", "AddV2", "Add", "AddN", "Mul", "Sub", "BiasAdd", "BiasAddGrad", "Square", "Neg",
        "RealDiv", "Maximum", "Select", "SelectV2", "ZerosLike", "OnesLike")),
    ("pooling, loss, reductions, other", lambda t, n: True),
)


def _tensorflow_profile(size, batch, steps, precision, backbone="resnet50", l2sp=0.01):
    quiet_tensorflow()
    import tfxfer
    import keras
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from tfxfer import speedups

    keras.config.set_dtype_policy(precision)
    keras.utils.set_random_seed(0)
    batches = iter(random_batches(size, batch))
    model = tfxfer.build_model(backbone, num_classes=10, weights=None, image_size=size, freeze="full", l2sp=l2sp)
    model.compile(keras.optimizers.SGD(0.001, momentum=0.9), "sparse_categorical_crossentropy")
    speedups.apply(model, log=lambda line: None)
    model.make_train_function()
    step_seconds = median_step_seconds(model, batches, steps, warmup=3)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            float(model.train_function(batches)["loss"])
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    per_kind, per_type, examples = collections.Counter(), collections.Counter(), {}
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
                ms = event.duration_ps / 1e9 / steps
                per_kind[kind] += ms
                per_type[op_type] += ms
                examples.setdefault(kind, collections.Counter())[op_type] += ms
    return step_seconds, per_kind, per_type, examples


def _torch_profile(size, batch, steps, precision, backbone="resnet50", l2sp=0.01):
    from torch.profiler import ProfilerActivity, profile, record_function

    if backbone == "resnet50":
        from benchmarks.torch_resnet import training_step

        step = training_step(size, batch, precision, l2sp=l2sp, phases=record_function)
    else:
        from benchmarks.families import timm_training_step

        step = timm_training_step(backbone, size, batch, precision, record_function)[0]
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e3 / steps for e in events if e.key in ("forward", "l2sp", "backward", "optimizer")}
    ops = collections.Counter({e.key: e.self_cpu_time_total / 1e3 / steps for e in events
                               if e.key not in phases and not e.key.startswith("ProfilerStep")})
    return sorted(times)[len(times) // 2], phases, ops


def _tensorflow_section(args):
    step, per_kind, per_type, examples = _tensorflow_profile(args.size, args.batch_size, args.steps, args.precision,
                                                             args.backbone, args.l2sp)
    total = sum(per_kind.values())
    return [
        "## tfxfer (TensorFlow profiler)", "",
        f"{args.backbone} full fine-tune (BatchNorm frozen) + L2-SP {args.l2sp:g}, Keras's SGD, the speed-ups "
        "`tfxfer finetune` applies. "
        f"Step: **{step * 1000:.0f} ms** ({args.batch_size / step:.1f} img/s, median of {args.steps}, without the "
        f"profiler). Op time: {total:.0f} ms per step, summed over TensorFlow's executor threads (ops overlap).", "",
        "| kind of op | ms per step | share of op time | largest op types |", "|---|---|---|---|",
        *[f"| {kind} | {per_kind[kind]:.1f} | {per_kind[kind] / total:.1%} | "
          f"{', '.join(f'`{t}`' for t, _ in examples[kind].most_common(3))} |"
          for kind, _ in KINDS if kind in per_kind],
        "", "Top five op types:", "", "| op type | ms per step | share |", "|---|---|---|",
        *[f"| `{t}` | {ms:.1f} | {ms / total:.1%} |" for t, ms in per_type.most_common(5)], "",
    ]


def _torch_section(args):
    try:
        import torch
    except ImportError:
        return ["PyTorch is not installed (`pip install -e '.[bench]'`): no PyTorch profile.", ""]
    step, phases, ops = _torch_profile(args.size, args.batch_size, args.steps, args.precision, args.backbone, args.l2sp)
    total = sum(ops.values())
    return [
        f"## PyTorch {torch.__version__} eager (torch.profiler)", "",
        f"The same model{' (timm)' if args.backbone != 'resnet50' else ''}, batch and recipe (BatchNorm frozen, "
        f"L2-SP {args.l2sp:g}, SGD momentum), channels-last input"
        f"{', torch.autocast bfloat16' if args.precision != 'float32' else ''}. Step: **{step * 1000:.0f} ms** "
        f"({args.batch_size / step:.1f} img/s, median of {args.steps}, without the profiler). Self CPU time of "
        f"all ops: {total:.0f} ms per step.", "",
        "| phase | ms per step |", "|---|---|",
        *[f"| {name} | {phases.get(name, 0):.1f} |" for name in ("forward", "l2sp", "backward", "optimizer")],
        "", "Top five ops by self time:", "", "| op | ms per step | share |", "|---|---|---|",
        *[f"| `{op}` | {ms:.1f} | {ms / total:.1%} |" for op, ms in ops.most_common(5)], "",
    ]


def main(argv, prog="python -m benchmarks profile"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50", choices=("resnet50", "vit_b16", "convnext_tiny"))
    parser.add_argument("--l2sp", type=float, default=0.01)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--framework", default="both", choices=("tensorflow", "torch", "both"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.child:
        section = _tensorflow_section if args.framework == "tensorflow" else _torch_section
        return child_result({"lines": section(args)})
    prefix = "" if args.backbone == "resnet50" else args.backbone + "-"
    out = args.out or os.path.join(ROOT, "benchmarks", f"profile-{prefix}{args.size}px-{args.precision}.md")
    lines = [f"# Where the training step's time goes: {args.backbone}, {args.size} px, batch {args.batch_size}, "
             f"{args.precision}", "", *stamp(f"{prog} {' '.join(argv)}".strip())]
    # One process each: TensorFlow and PyTorch bring their own oneDNN and threads.
    for framework in (("tensorflow", "torch") if args.framework == "both" else (args.framework,)):
        python = None
        if framework == "torch" and args.backbone != "resnet50":
            from benchmarks.families import ensure_timm

            python = ensure_timm()
        lines += run_child("profile", "--framework", framework, "--backbone", args.backbone, "--l2sp", str(args.l2sp),
                           "--size", str(args.size), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                           "--precision", args.precision, python=python)["lines"]
    write_report(out, lines)
