"""tfxfer's rerouted convolutions against Keras's own, in the full training step.

Random-init ResNet50, `freeze="full"` (BatchNorm frozen), L2-SP 0.01, SGD with
momentum, float32, on cached random uint8 images. For each image size, two
models live in one process: one built by tfxfer (`fast_convolutions`), one
with Keras's convolutions restored (`plain_convolutions`). Rounds alternate
between them; each round times `--steps` steps after 2 warm-up steps and keeps
the median. Sizes where no layer is rerouted are listed without timing: both
models run the same graph there.

    python benchmarks/convolutions.py                  # 32 and 64 px at batch 64, 224 px at 16
Writes benchmarks/convolutions.md (or --out).
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
    parser.add_argument("--sizes", default="32:64,64:64,224:16", help="size:batch pairs")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "convolutions.md"))
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    import tfxfer
    from tfxfer.backbones.convolution import PATCH_GRADIENT_MAX_PIXELS, POINTWISE_MAX_PIXELS, plain_convolutions, routes
    from stepping import median_step_seconds, random_batches
    from tfxfer.runtime import describe_cpu

    def build(size, fast):
        keras.utils.set_random_seed(0)
        model = tfxfer.build_model("resnet50", num_classes=10, weights=None, image_size=size, freeze="full", l2sp=0.01)
        if not fast:
            plain_convolutions(model.backbone)
        model.compile(keras.optimizers.SGD(1e-3, momentum=0.9), "sparse_categorical_crossentropy")
        model.make_train_function()
        return model

    rows = []
    for pair in args.sizes.split(","):
        size, batch = (int(v) for v in pair.split(":"))
        fast = build(size, True)
        counts = routes(fast.backbone)
        route_text = f"{counts['pointwise']} pointwise, {counts['patch gradient']} patch gradient, {counts['keras']} Keras"
        if counts["keras"] == sum(counts.values()):
            rows.append(f"| {size} px, batch {batch} | {route_text} | – | – | same graph |")
            continue
        data = random_batches(size, batch)
        models = {"keras": (build(size, False), iter(data)), "tfxfer": (fast, iter(data))}
        rounds = {name: [] for name in models}
        for r in range(args.rounds):
            for name in (list(models) if r % 2 == 0 else list(reversed(models))):
                rounds[name].append(median_step_seconds(*models[name], args.steps, warmup=2))
        keras_s, fast_s = (statistics.median(rounds[name]) for name in ("keras", "tfxfer"))
        per_round = "; ".join(f"{name} {', '.join(f'{batch / t:.1f}' for t in values)}" for name, values in rounds.items())
        rows.append(
            f"| {size} px, batch {batch} | {route_text} | {batch / keras_s:.1f} | {batch / fast_s:.1f} | "
            f"**{keras_s / fast_s:.2f}×** |"
        )
        rows.append(f"|  | per round (img/s): {per_round} | | | |")
        del models
        print(rows[-2], flush=True)

    lines = [
        "# Convolutions: tfxfer's paths against Keras's own", "",
        f"Machine: {describe_cpu()}; TensorFlow {tf.__version__}, Keras {keras.__version__}.", "",
        "ResNet50 (53 convolutions), full fine-tune + L2-SP 0.01, BatchNorm frozen, SGD momentum, float32; "
        f"img/s = batch / median step of {args.steps} after 2 warm-up steps, median of {args.rounds} alternating rounds.", "",
        "| setting | convolutions by path | Keras convolutions (img/s) | tfxfer (img/s) | speed-up |",
        "|---|---|---|---|---|",
        *rows, "",
        (
            "`pointwise`: a 1x1 convolution computed as one matrix product over pixels (output of at most "
            f"{POINTWISE_MAX_PIXELS} pixels). `patch gradient`: a k x k convolution whose kernel gradient is one "
            f"matrix product over image patches (output of at most {PATCH_GRADIENT_MAX_PIXELS} pixels). Both are "
            "exact up to float rounding (`tests/test_convolution.py`)."
        ),
        "",
        f"Command: `python benchmarks/convolutions.py --sizes {args.sizes} --steps {args.steps} --rounds {args.rounds}`", "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
