"""The cost of the L2-SP penalty: tfxfer's training step with and without it,
and with tfxfer's fused SGD against Keras's.

Random-init ResNet50 (`freeze="full"`, BatchNorm frozen), 10-class head, SGD
with momentum, `--size` px, batch `--batch-size`, on cached random uint8 images.
The four models live in one process; rounds alternate between them and each round
times `--steps` training steps after 3 warm-up steps (the median is kept), so a
change in the machine's speed hits both alike.

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "l2sp_overhead.md"))
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tfxfer
    import keras
    import tensorflow as tf

    from stepping import median_step_seconds, random_batches
    from tfxfer.runtime import describe_cpu

    keras.utils.set_random_seed(0)
    data = random_batches(args.size, args.batch_size, batches=8)
    models = {}
    contenders = {  # name: (alpha, optimizer)
        "without L2-SP": (0.0, "tfxfer"),
        f"L2-SP {args.alpha:g}": (args.alpha, "tfxfer"),
        "without L2-SP, Keras's SGD": (0.0, "keras"),
        f"L2-SP {args.alpha:g}, Keras's SGD": (args.alpha, "keras"),
    }
    for name, (alpha, optimizer) in contenders.items():
        model = tfxfer.build_model("resnet50", num_classes=10, weights=None, image_size=args.size, freeze="full", l2sp=alpha)
        sgd = tfxfer.optim.make_optimizer("sgd", 1e-3) if optimizer == "tfxfer" else keras.optimizers.SGD(1e-3, momentum=0.9)
        model.compile(sgd, "sparse_categorical_crossentropy")
        model.make_train_function()
        models[name] = (model, iter(data))

    rounds = {name: [] for name in models}
    for r in range(args.rounds):
        for name in (list(models) if r % 2 == 0 else list(reversed(models))):
            rounds[name].append(median_step_seconds(*models[name], args.steps, warmup=3))
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    plain, penalized, keras_plain, keras_penalized = medians.values()
    lines = [
        "# L2-SP overhead", "",
        f"Machine: {describe_cpu()}; TensorFlow {tf.__version__}, Keras {keras.__version__}.", "",
        f"ResNet50, `freeze=full` (BatchNorm frozen), {args.size} px, batch {args.batch_size}, float32, SGD momentum "
        "(tfxfer's fused SGD unless named); "
        f"median step of {args.steps} after 3 warm-up steps, per round; {args.rounds} alternating rounds.", "",
        "| step | img/s (median of rounds) | img/s per round |", "|---|---|---|",
        *[f"| {name} | {args.batch_size / medians[name]:.1f} | {', '.join(f'{args.batch_size / t:.1f}' for t in values)} |"
          for name, values in rounds.items()],
        "", f"**Overhead of L2-SP: {100 * (penalized / plain - 1):.1f}%** of the step "
        f"(with Keras's SGD: {100 * (keras_penalized / keras_plain - 1):.1f}%). "
        f"tfxfer's fused SGD against Keras's: {keras_plain / plain:.3f}× without L2-SP, "
        f"{keras_penalized / penalized:.3f}× with it.", "",
        f"Command: `python benchmarks/l2sp_overhead.py --size {args.size} --batch-size {args.batch_size} "
        f"--steps {args.steps} --rounds {args.rounds} --alpha {args.alpha:g}`", "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
