"""L2-SP and the CPU speed-ups, each against the training step without it, in one process.

Random-init ResNet50, `freeze="full"` (BatchNorm frozen), 10-class head,
Keras's SGD with momentum, on cached random uint8 images. Three models live in
one process:

* `full`: the step `tfxfer finetune` runs, with `tfxfer.speedups` applied;
* `full+L2-SP`: the same with the L2-SP term (α = 0.01);
* `full+L2-SP, plain`: the same without the speed-ups (Keras's own convolutions).

Rounds alternate between them; each round keeps the median of `--steps` steps
after one warm-up step. A figure is the median over rounds of the ratio of two
models' times in the same round: across processes the step varies by more
than the effects measured here.

    python -m benchmarks paired                              # 32 px at 64, 224 px at 16, float32
    python -m benchmarks paired --sizes 224:16 --precision mixed_bfloat16
Writes benchmarks/paired.md (or --out).
"""

import argparse
import os
import statistics

from benchmarks.harness import ROOT, alternating_rounds, child_result, paired_ratio, quiet_tensorflow, random_batches, stamp, write_report

MODELS = ("full", "full+L2-SP", "full+L2-SP, plain")


def measure(size, batch, steps, rounds, precision="float32"):
    """`{"seconds": {model: [per round]}, "l2sp": overhead, "speedups": gain, "routes": {...}}`."""
    quiet_tensorflow()
    import tfxfer
    import keras

    from tfxfer import speedups

    keras.config.set_dtype_policy(precision)
    keras.utils.set_random_seed(0)
    data = random_batches(size, batch, batches=8)
    models, routes = {}, None
    for name in MODELS:
        model = tfxfer.build_model("resnet50", num_classes=10, weights=None, image_size=size, freeze="full",
                                   l2sp=0.0 if name == "full" else 0.01)
        model.compile(keras.optimizers.SGD(1e-3, momentum=0.9), "sparse_categorical_crossentropy")
        if not name.endswith("plain"):
            speedups.apply(model, log=lambda line: None, mode="force")  # kept for the life of this process; measured on any CPU
            routes = speedups.routes(model)
        model.make_train_function()
        models[name] = (model, iter(data))
    rerouted = routes["pointwise"] + routes["patch gradient"]
    if not rerouted:  # the same graph with and without: time two models, not three
        models.pop("full+L2-SP, plain")
    times = alternating_rounds(models, rounds, steps)
    return {"seconds": times, "routes": routes,
            "l2sp": paired_ratio(times["full+L2-SP"], times["full"]) - 1,
            "speedups": paired_ratio(times["full+L2-SP, plain"], times["full+L2-SP"]) if rerouted else None}


def main(argv, prog="python -m benchmarks paired"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32:64,224:16", help="size:batch pairs")
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16", "mixed_float16"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds (default: 12 at 64 px and below, 4 above)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "paired.md"))
    args = parser.parse_args(argv)
    pairs = [tuple(int(v) for v in pair.split(":")) for pair in args.sizes.split(",")]
    results = {}
    for size, batch in pairs:
        rounds = args.rounds or (12 if size <= 64 else 4)
        results[size] = (batch, rounds, measure(size, batch, args.steps, rounds, args.precision))
    if args.child:
        return child_result({str(size): r for size, (_, _, r) in results.items()})
    lines = ["# L2-SP and the CPU speed-ups, paired in one process", "",
             *stamp(f"{prog} {' '.join(argv)}".strip()),
             f"ResNet50, full fine-tune (BatchNorm frozen), {args.precision}, Keras's SGD; per round the median of "
             f"{args.steps} steps after one warm-up step, rounds alternating. img/s = batch / median over rounds.", "",
             "| size, batch | rounds | full | full+L2-SP | full+L2-SP, plain | L2-SP overhead | speed-ups gain | rerouted convolutions |",
             "|---|---|---|---|---|---|---|---|"]
    for size, (batch, rounds, r) in results.items():
        rate = {name: f"{batch / statistics.median(values):.1f}" for name, values in r["seconds"].items()}
        gain = f"**{r['speedups']:.2f}×**" if r["speedups"] else "– (same graph)"
        lines.append(f"| {size} px, {batch} | {rounds} | {rate['full']} | {rate['full+L2-SP']} | "
                     f"{rate.get('full+L2-SP, plain', '–')} | **{100 * r['l2sp']:+.1f}%** | {gain} | "
                     f"{r['routes']['pointwise']} pointwise, {r['routes']['patch gradient']} patch gradient |")
    lines += ["", "The L2-SP overhead is full+L2-SP's step time over full's, minus one; the speed-ups gain is the plain "
              "step's time over the step with the speed-ups (above 1: they pay)."]
    write_report(args.out, lines)
