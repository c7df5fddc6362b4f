"""The cost of the L2-SP penalty: tfxfer's training step with and without it,
with the pull in tfxfer's kernel or in TensorFlow ops, and with tfxfer's
fused SGD against Keras's.

Random-init ResNet50 (`freeze="full"`, BatchNorm frozen), 10-class head, SGD
with momentum, `--size` px, batch `--batch-size`, on cached random uint8 images.
The five models live in one process. Each round times `--steps` steps of each
model in turn (after one warm-up step; the median is kept), in alternating
order; the overhead is the median over rounds of the ratio of two models' times
in the same round, so a change in the machine's speed, which on a shared
machine can be 30% within a minute, hits both sides of a ratio alike.

    python benchmarks/l2sp_overhead.py                 # 32 px, batch 64
Writes benchmarks/l2sp_overhead.md (or --out).
"""

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


CONTENDERS = {  # name: (with L2-SP, optimizer)
    "without L2-SP": (False, "tfxfer"),
    "L2-SP": (True, "tfxfer"),
    "L2-SP, pull in TensorFlow ops": (True, "tfxfer, no kernel"),
    "without L2-SP, Keras's SGD": (False, "keras"),
    "L2-SP, Keras's SGD": (True, "keras"),
}


def measure(size, batch_size, steps, rounds, alpha, names=tuple(CONTENDERS)):
    """`{name: [median step seconds, one per round]}` for the contenders `names`,
    built in this process and timed in alternating order round after round."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tfxfer
    import keras

    from stepping import median_step_seconds, random_batches

    keras.utils.set_random_seed(0)
    data = random_batches(size, batch_size, batches=8)
    models = {}
    for name in names:
        penalized, optimizer = CONTENDERS[name]
        model = tfxfer.build_model("resnet50", num_classes=10, weights=None, image_size=size, freeze="full",
                                   l2sp=alpha if penalized else 0.0)
        sgd = tfxfer.optim.make_optimizer("sgd", 1e-3) if optimizer != "keras" else keras.optimizers.SGD(1e-3, momentum=0.9)
        if optimizer == "tfxfer, no kernel":
            sgd.can_pull = lambda: False  # what runs where tfxfer.kernels cannot build
        model.compile(sgd, "sparse_categorical_crossentropy")
        model.make_train_function()
        models[name] = (model, iter(data))
    times = {name: [] for name in models}
    for r in range(rounds):
        for name in (list(models) if r % 2 == 0 else list(reversed(models))):
            times[name].append(median_step_seconds(*models[name], steps, warmup=1))
    return times


def paired_ratio(a, b):
    """The median over rounds of a's time / b's time in the same round."""
    return statistics.median(x / y for x, y in zip(a, b))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "l2sp_overhead.md"))
    args = parser.parse_args()

    rounds = measure(args.size, args.batch_size, args.steps, args.rounds, args.alpha)
    import keras
    import tensorflow as tf

    from tfxfer.runtime import describe_cpu

    medians = {name: statistics.median(values) for name, values in rounds.items()}
    plain, penalized, unfused, keras_plain, keras_penalized = rounds.values()
    lines = [
        "# L2-SP overhead", "",
        f"Machine: {describe_cpu()}; TensorFlow {tf.__version__}, Keras {keras.__version__}.", "",
        f"ResNet50, `freeze=full` (BatchNorm frozen), {args.size} px, batch {args.batch_size}, float32, SGD momentum "
        f"(tfxfer's fused SGD unless named), L2-SP α = {args.alpha:g}; "
        f"per round, the median of {args.steps} steps after one warm-up step; {args.rounds} rounds in alternating order.", "",
        "| step | img/s (median of rounds) | img/s, lowest and highest round |", "|---|---|---|",
        *[f"| {name} | {args.batch_size / medians[name]:.1f} | {args.batch_size / max(values):.1f} – {args.batch_size / min(values):.1f} |"
          for name, values in rounds.items()],
        "", "Ratios of step times, each the median over rounds of the ratio within a round:", "",
        f"- **Overhead of L2-SP: {100 * (paired_ratio(penalized, plain) - 1):.1f}%** of the step, with the pull in tfxfer's kernel",
        f"- with the pull in TensorFlow ops (where the kernel cannot be built): {100 * (paired_ratio(unfused, plain) - 1):.1f}%",
        f"- with Keras's SGD (the pull in TensorFlow ops): {100 * (paired_ratio(keras_penalized, keras_plain) - 1):.1f}%",
        f"- tfxfer's fused SGD against Keras's: {paired_ratio(keras_plain, plain):.3f}× without L2-SP, "
        f"{paired_ratio(keras_penalized, penalized):.3f}× with it", "",
        f"Command: `python benchmarks/l2sp_overhead.py --size {args.size} --batch-size {args.batch_size} "
        f"--steps {args.steps} --rounds {args.rounds} --alpha {args.alpha:g}`", "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
