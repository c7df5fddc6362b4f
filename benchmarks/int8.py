"""INT8 LiteRT: size, batch-1 latency and test accuracy against the float SavedModel.

For each fine-tuned run given, the run's float SavedModel is the reference;
`tfxfer export --format litert` writes the float LiteRT file, and with
`--quantize dynamic` and `--quantize int8` the two quantized ones (int8
calibrated on 300 of the run's training images). Each is scored on the run's
whole test split (its own data, read from its config) and timed at batch 1 in
its runtime: the median of `--repeats` calls after `--warmup`, the formats
alternating in `--rounds` rounds.

    python -m benchmarks int8 --run RUNS/resnet9-run --run RUNS/resnet50-run
Writes benchmarks/int8.md (or --out).
"""

import argparse
import os
import statistics

from benchmarks.harness import ROOT, call_latencies, quiet_tensorflow, stamp, write_report


def main(argv, prog="python -m benchmarks int8"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="a finished finetune run folder (repeatable)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "int8.md"))
    args = parser.parse_args(argv)

    quiet_tensorflow()
    import numpy as np
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from tfxfer import runs
    from tfxfer.config import load_config
    from tfxfer.export import export_run
    from tfxfer.export.layout import find_export
    from tfxfer.export.registry import disk_size

    lines = [
        "# INT8 LiteRT: size, batch-1 latency, test accuracy", "",
        *stamp(f"{prog} {' '.join(argv)}".strip()),
        f"Latency: one uint8 image per call, median of {args.repeats} calls after {args.warmup} warm-up calls, "
        f"formats alternating in {args.rounds} rounds (LiteRT interpreter with XNNPACK, 2 threads; SavedModel in "
        "TensorFlow). Accuracy: every test image of the run's own data.", "",
        "| run | backbone, size | format | size on disk | batch-1 latency | test accuracy | vs float SavedModel |",
        "|---|---|---|---|---|---|---|",
    ]
    for run_dir in args.run:
        config = load_config(os.path.join(run_dir, "config.yaml"))
        _, _, test, info, size = runs.load_data(config, log=lambda message: None, augment="none")
        images, labels = zip(*test.as_numpy_iterator())
        images, labels = np.concatenate(images), np.concatenate(labels)

        files = {"SavedModel float32": find_export(run_dir)}
        files["LiteRT float32"] = export_run(run_dir, "litert", log=lambda *_: None)[0]
        for quantize in ("dynamic", "int8"):
            files[f"LiteRT {quantize}"] = export_run(run_dir, "litert", log=print, quantize=quantize)[0]

        served = tf.saved_model.load(files["SavedModel float32"]).signatures["serving_default"]
        interpreters = {name: Interpreter(model_path=path, num_threads=2) for name, path in files.items() if name != "SavedModel float32"}

        def litert(interpreter, batch):
            entry = interpreter.get_input_details()[0]
            if tuple(entry["shape"]) != batch.shape:
                interpreter.resize_tensor_input(entry["index"], batch.shape)
                interpreter.allocate_tensors()
            interpreter.set_tensor(entry["index"], batch)
            interpreter.invoke()
            return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

        runners = {"SavedModel float32": lambda x: served(images=tf.constant(x))["probabilities"].numpy()}
        runners.update({name: (lambda x, i=interpreter: litert(i, x)) for name, interpreter in interpreters.items()})
        accuracy = {}
        for name, run in runners.items():
            predicted = np.concatenate([run(images[s:s + 64]).argmax(axis=1) for s in range(0, len(images), 64)])
            accuracy[name] = float((predicted == labels).mean())
        times = call_latencies(runners, images[:1], args.warmup, args.repeats, args.rounds)
        reference = accuracy["SavedModel float32"]
        for name, path in files.items():
            lines.append(
                f"| {os.path.basename(os.path.normpath(run_dir))} | {config.model.backbone}, {size} px | {name} | "
                f"{disk_size(path) / 2**20:.2f} MiB | {statistics.median(times[name]) * 1000:.2f} ms | "
                f"{100 * accuracy[name]:.2f}% ({len(labels)}) | {100 * (accuracy[name] - reference):+.2f} points |"
            )
    lines += [
        "",
        "`dynamic` stores the weights in int8 and computes in float; `int8` computes in int8 throughout, with "
        "uint8 pixels in and float32 probabilities out. The export prints a warning when a quantized model "
        "loses more than 2 points of test accuracy.", "",
    ]
    write_report(args.out, lines)
