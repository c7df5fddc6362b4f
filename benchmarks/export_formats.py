"""Export formats: size on disk and batch-1 latency of each, for one model.

tfxfer's ResNet50 (random init: the weights do not change the cost) with a
10-class head, saved as a run's `model.keras`, exported with `tfxfer.export`
to SavedModel, ONNX and LiteRT (each checked against the SavedModel within
1e-4 by the export itself). Latency: one uint8 image at the model's size, the
median of `--repeats` calls after `--warmup`, each format in its own runtime
(TensorFlow, ONNX Runtime, the LiteRT interpreter), rounds alternating between
formats so that a change in the machine's speed hits them all alike. The
in-memory Keras model is the reference row.

    python -m benchmarks export-formats                # resnet50, 224 px
Writes benchmarks/export_formats.md (or --out).
"""

import argparse
import os
import statistics
import tempfile
import time

from benchmarks.harness import ROOT, call_latencies, quiet_tensorflow, stamp, write_report


def main(argv, prog="python -m benchmarks export-formats"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "export_formats.md"))
    args = parser.parse_args(argv)

    quiet_tensorflow()
    import tfxfer
    import keras
    import numpy as np
    import onnx
    import onnxruntime
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from tfxfer.export import export_run
    from tfxfer.export.registry import disk_size

    keras.utils.set_random_seed(0)
    run_dir = tempfile.mkdtemp(prefix="tfxfer-export-bench-")
    model = tfxfer.build_model(args.backbone, num_classes=10, weights=None, image_size=args.size,
                               class_names=[str(i) for i in range(10)])
    model.save(os.path.join(run_dir, "model.keras"))
    image = np.random.default_rng(1).integers(0, 256, (1, args.size, args.size, 3), np.uint8)

    artifacts, differences, convert_seconds = {}, {}, {}
    for name in ("saved_model", "onnx", "litert"):
        start = time.perf_counter()
        artifacts[name], differences[name] = export_run(run_dir, name, log=lambda *_: None)
        convert_seconds[name] = time.perf_counter() - start

    served = tf.saved_model.load(artifacts["saved_model"]).signatures["serving_default"]
    session = onnxruntime.InferenceSession(artifacts["onnx"], providers=["CPUExecutionProvider"])
    onnx_input = session.get_inputs()[0].name
    interpreter = Interpreter(model_path=artifacts["litert"])
    entry = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(entry["index"], image.shape)
    interpreter.allocate_tensors()
    keras_call = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False))

    def litert(x):
        interpreter.set_tensor(entry["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    runners = {
        "Keras model in memory (tf.function)": lambda x: keras_call(x).numpy(),
        "SavedModel (TensorFlow)": lambda x: served(images=tf.constant(x))["probabilities"].numpy(),
        "ONNX (ONNX Runtime)": lambda x: session.run(None, {onnx_input: x})[0],
        "LiteRT (interpreter, XNNPACK)": litert,
    }
    times = call_latencies(runners, image, args.warmup, args.repeats, args.rounds)

    files = {"SavedModel (TensorFlow)": "saved_model", "ONNX (ONNX Runtime)": "onnx", "LiteRT (interpreter, XNNPACK)": "litert"}
    weight_bytes = sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    lines = [
        "# Export formats: size and batch-1 latency", "",
        *stamp(f"{prog} {' '.join(argv)}".strip()),
        f"ONNX Runtime {onnxruntime.__version__}, onnx {onnx.__version__}.", "",
        f"{args.backbone} + 10-class head, {args.size} px, float32, one uint8 image per call; median of "
        f"{len(next(iter(times.values())))} calls after {args.warmup} warm-up calls, formats alternating in "
        f"{args.rounds} rounds. Weights: {weight_bytes / 2**20:.1f} MiB.", "",
        "| format | size on disk | batch-1 latency (median) | vs Keras in memory | export time | max abs diff vs SavedModel |",
        "|---|---|---|---|---|---|",
    ]
    reference = statistics.median(times["Keras model in memory (tf.function)"])
    for name, values in times.items():
        median = statistics.median(values)
        fmt = files.get(name)
        lines.append(
            f"| {name} | {disk_size(artifacts[fmt]) / 2**20:.1f} MiB |" if fmt else f"| {name} | - |"
        )
        lines[-1] += (f" {median * 1000:.1f} ms | {median / reference:.2f}× |"
                      + (f" {convert_seconds[fmt]:.0f} s | {differences[fmt]:.1e} |" if fmt else " - | - |"))
    lines += [
        "",
        "ONNX and LiteRT take images already at the model's size (the antialiased resize of training has no ONNX "
        "or LiteRT op; see `tfxfer/export/portable.py`); the SavedModel resizes inside, at the same size a no-op.",
        "",
    ]
    write_report(args.out, lines)

