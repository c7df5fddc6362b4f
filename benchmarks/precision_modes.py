"""bfloat16 routes for tfxfer's training step, each against float32, on this CPU.

ResNet50 from random weights, full fine-tune with BatchNorm frozen, L2-SP 0.01,
Keras's SGD with momentum, on cached random uint8 images, the CPU speed-ups
applied as `tfxfer finetune` applies them. Routes:

* `float32`: the float32 policy;
* `mixed_bfloat16`: Keras's policy (float32 variables, bfloat16 computation,
  a cast of every weight at every use);
* `onednn rewrite`: the float32 policy, with TensorFlow's graph rewrite
  `auto_mixed_precision_onednn_bfloat16`, which turns the graph's eligible
  ops to bfloat16 and inserts the casts it needs;
* `mixed_bfloat16 + XLA`: the policy, compiled with XLA.

The rewrite is a process-wide switch, so every route runs in a process of its
own; the routes alternate round after round (`benchmarks.harness`).

    python -m benchmarks precision-modes                      # 224 px at 16, 32 px at 64
Writes benchmarks/precision_modes.md (or --out).
"""

import argparse
import os
import statistics

from benchmarks.harness import ROOT, child_result, median_step_seconds, quiet_tensorflow, random_batches, run_child, stamp, write_report

ROUTES = ("float32", "mixed_bfloat16", "onednn rewrite", "mixed_bfloat16 + XLA")


def child(route, size, batch, steps):
    quiet_tensorflow()
    import tfxfer
    import keras
    import tensorflow as tf

    from tfxfer import speedups

    if route == "onednn rewrite":
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    keras.config.set_dtype_policy("float32" if route in ("float32", "onednn rewrite") else "mixed_bfloat16")
    keras.utils.set_random_seed(0)
    model = tfxfer.build_model("resnet50", num_classes=10, weights=None, image_size=size, freeze="full", l2sp=0.01)
    model.compile(keras.optimizers.SGD(0.001, momentum=0.9), "sparse_categorical_crossentropy",
                  jit_compile=route.endswith("XLA"))
    speedups.apply(model, log=lambda line: None)
    model.make_train_function()
    seconds = median_step_seconds(model, iter(random_batches(size, batch)), steps, warmup=3)
    child_result({"images_per_second": batch / seconds})


def main(argv, prog="python -m benchmarks precision-modes"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224:16,32:64", help="size:batch pairs")
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 5 at 224 px, 15 at 32 px)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "precision_modes.md"))
    args = parser.parse_args(argv)
    routes = args.routes.split(",")
    if args.child:
        return child(args.child[0], *(int(v) for v in args.child[1].split(":")), int(args.child[2]))
    results = {}
    for pair in args.sizes.split(","):
        size, _ = (int(v) for v in pair.split(":"))
        steps = args.steps or (5 if size > 64 else 15)
        for r in range(args.rounds):
            for route in (routes if r % 2 == 0 else list(reversed(routes))):
                rate = run_child("precision-modes", route, pair, str(steps))["images_per_second"]
                results.setdefault((pair, route), []).append(rate)
                print(pair, route, f"{rate:.1f}", flush=True)
    lines = ["# bfloat16 routes against float32", "", *stamp(f"{prog} {' '.join(argv)}".strip()),
             f"ResNet50 full fine-tune (BatchNorm frozen) + L2-SP 0.01, Keras's SGD, speed-ups applied; each route in "
             f"its own process, {args.rounds} alternating rounds; img/s = batch / median step time after 3 warm-up "
             "steps, median over rounds.", "",
             "| size, batch | " + " | ".join(routes) + " |", "|---|" + "---|" * len(routes)]
    for pair in args.sizes.split(","):
        base = statistics.median(results[(pair, "float32")]) if (pair, "float32") in results else None
        cells = []
        for route in routes:
            rate = statistics.median(results[(pair, route)])
            cells.append(f"{rate:.1f}" + (f" ({rate / base:.2f}×)" if base and route != "float32" else ""))
        lines.append(f"| {pair.replace(':', ' px, ')} | " + " | ".join(cells) + " |")
    lines += ["", "Per round: " + "; ".join(f"{pair} {route}: " + ", ".join(f"{v:.1f}" for v in values)
                                         for (pair, route), values in results.items()), ""]
    write_report(args.out, lines)
