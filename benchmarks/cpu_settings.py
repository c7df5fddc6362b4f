"""What oneDNN, TF op determinism, XLA and thread counts do to a tfxfer training step, on this CPU.

oneDNN is fixed when TensorFlow loads, so every measurement runs in its own
process. Settings alternate in one run, `--repeats` times; each measurement is
batch size over the median step time of `--steps` steps after two warm-up steps.
The model is tfxfer's `build_model` (random init, full fine-tune, BN frozen,
L2-SP 0.01, tfxfer's SGD, float32) on a cached `tf.data` of random uint8 images.

    python benchmarks/cpu_settings.py                          # ResNet50 32 px, batch 64
    python benchmarks/cpu_settings.py --backbone resnet9 --batch-size 128
Writes benchmarks/cpu_settings.md (or --out).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Measure the checkout this script is in, whatever is installed.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = [  # (label, TF_ENABLE_ONEDNN_OPTS, extra child flags)
    ("oneDNN on, determinism off (tfxfer default)", "1", []),
    ("oneDNN on, determinism on (--deterministic)", "1", ["--deterministic"]),
    ("oneDNN off, determinism off (TensorFlow's default on AVX2)", "0", []),
    ("XLA (--jit-compile)", "1", ["--jit"]),
    ("intra-op threads 2, inter-op 1", "1", ["--intra", "2", "--inter", "1"]),
    ("intra-op threads 1, inter-op 2", "1", ["--intra", "1", "--inter", "2"]),
]


def measure(args):
    """Child process: time training steps under the inherited environment."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tfxfer
    import keras
    import numpy as np
    import tensorflow as tf

    from tfxfer.runs import seed_everything

    if args.intra:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra)
    if args.inter:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter)

    seed_everything(0, deterministic=args.deterministic)
    model = tfxfer.build_model(
        args.backbone, num_classes=10, weights=None, image_size=args.size, freeze="full", l2sp=0.01
    )
    model.compile(tfxfer.optim.make_optimizer("sgd", 0.001), "sparse_categorical_crossentropy", jit_compile=args.jit)
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, args.size, args.size, 3), np.uint8)
    labels = np.arange(args.batch_size) % 10
    data = tf.data.Dataset.from_tensors((images, labels)).repeat().take(args.steps + 2).cache()
    ends = []
    timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    model.fit(data, epochs=1, callbacks=[timer], verbose=0)
    steps = [b - a for a, b in zip(ends[1:], ends[2:])]  # the first two steps warm up
    print(json.dumps({"images_per_second": args.batch_size / statistics.median(steps),
                      "onednn": tfxfer.runtime.onednn_enabled()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "cpu_settings.md"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deterministic", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--intra", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--inter", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(args)

    from tfxfer.runtime import cpu_flags, cpu_name

    results = {label: [] for label, _, _ in SETTINGS}
    for repeat in range(args.repeats):
        for label, onednn, extra in SETTINGS:
            command = [sys.executable, __file__, "--child", "--backbone", args.backbone, "--size", str(args.size),
                       "--batch-size", str(args.batch_size), "--steps", str(args.steps), *extra]
            env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn}
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            assert result["onednn"] == (onednn == "1"), result
            results[label].append(result["images_per_second"])
            print(f"[{repeat + 1}/{args.repeats}] {label}: {result['images_per_second']:.1f} img/s", flush=True)

    default = statistics.median(results[SETTINGS[0][0]])
    flags = " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))))
    command = " ".join(["python", "benchmarks/cpu_settings.py", "--backbone", args.backbone, "--size", str(args.size),
                        "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--repeats", str(args.repeats)])
    lines = [
        f"# CPU settings (oneDNN, op determinism, XLA, threads): {args.backbone}, {args.size} px, batch {args.batch_size}",
        "",
        f"CPU: {cpu_name()} ({os.cpu_count()} cores; flags: {flags}).",
        f"Full fine-tune, BN frozen, L2-SP 0.01, SGD momentum, float32; median step of {args.steps} after warm-up,",
        f"{args.repeats} alternating processes per setting. Command: `{command}`",
        "",
        "| setting | img/s (median) | all measurements | default / setting |",
        "|---|---|---|---|",
    ]
    for label, values in results.items():
        median = statistics.median(values)
        lines.append(f"| {label} | {median:.1f} | {', '.join(f'{v:.1f}' for v in values)} | {default / median:.2f} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
