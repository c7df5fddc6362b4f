"""A script's `build_model` + `fit` against the step `tfxfer finetune` runs, in one process.

Random-init ResNet50, `freeze="full"` (BatchNorm frozen), L2-SP 0.01, Keras's
SGD with momentum, on cached random uint8 images. Three models alternate, each
trained by Keras's `fit` for `--steps` steps a round:

* `script`: what a user's script gets, `build_model(...)` + `compile` + `fit`;
* `script, speed-ups off`: the same with `speedups="off"`, the plain Keras step;
* `command`: the model as `tfxfer finetune` trains it, the speed-ups applied
  around the whole run (`training_speedups`) rather than by `fit`.

Per round and model: the median step (batch end to batch end) and what `fit`
spent beyond its steps (start-up and the end of the epoch). A figure is the
median over the rounds after the first, which traces.

    python -m benchmarks script-fit                                  # 32 px at 64 and 224 px at 16, auto precision
Writes benchmarks/script_fit.md (or --out).
"""

import argparse
import os
import statistics
import time

from benchmarks.harness import ROOT, quiet_tensorflow, random_batches, stamp, write_report

MODELS = ("script", "script, speed-ups off", "command")


class _Clock:
    """Batch end times and the wall time of one `fit`."""

    def __init__(self, keras):
        outer = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                outer.ends.append(time.perf_counter())

        self.callback, self.ends = Callback(), []


def _fit_round(keras, model, data, steps):
    clock = _Clock(keras)
    start = time.perf_counter()
    clock.ends.append(start)
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[clock.callback])
    wall = time.perf_counter() - start
    gaps = [b - a for a, b in zip(clock.ends[1:], clock.ends[2:])]  # from the second step: the first holds start-up
    step = statistics.median(gaps)
    return step, wall - step * steps


def measure(size, batch, steps, rounds, precision):
    quiet_tensorflow()
    import tfxfer
    import keras

    policy, _ = tfxfer.set_precision(precision)
    keras.utils.set_random_seed(0)
    data = random_batches(size, batch, batches=4)
    models = {}
    for name in MODELS:
        model = tfxfer.build_model("resnet50", num_classes=10, weights=None, image_size=size, freeze="full", l2sp=0.01,
                                   speedups="off" if name.endswith("off") else "auto")
        model.compile(keras.optimizers.SGD(1e-3, momentum=0.9), "sparse_categorical_crossentropy")
        if name == "command":
            model.training_speedups(log=lambda line: None)  # on for the life of this process, as for a run
        models[name] = model
    step, extra = {n: [] for n in MODELS}, {n: [] for n in MODELS}
    for r in range(rounds + 1):
        for name in (MODELS if r % 2 == 0 else tuple(reversed(MODELS))):
            s, e = _fit_round(keras, models[name], data, steps)
            if r:  # the first round traces
                step[name].append(s)
                extra[name].append(e)
    return policy, {n: (statistics.median(step[n]), statistics.median(extra[n])) for n in MODELS}


def main(argv, prog="python -m benchmarks script-fit"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32:64,224:16", help="size:batch pairs")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "mixed_bfloat16"))
    parser.add_argument("--steps", type=int, default=8, help="steps of each fit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "script_fit.md"))
    args = parser.parse_args(argv)
    rows = []
    for pair in args.sizes.split(","):
        size, batch = map(int, pair.split(":"))
        policy, result = measure(size, batch, args.steps, args.rounds, args.precision)
        command = result["command"][0]
        for name in MODELS:
            seconds, extra = result[name]
            rows.append(f"| {size} px, {batch} | {policy} | {name} | {batch / seconds:.1f} | {command / seconds:.2f}× "
                        f"| {extra:.2f} |")
    lines = ["# A script's build_model + fit against the command's step", "",
             *stamp(f"{prog} {' '.join(argv)}".strip()),
             f"ResNet50 full fine-tune (BatchNorm frozen) + L2-SP 0.01, Keras's SGD, random uint8 images; {args.rounds} "
             f"alternating rounds of one `fit` of {args.steps} steps per model, after a round that traces. img/s = batch "
             "/ the median step (batch end to batch end, from the second step); `fit` beyond its steps = the wall time "
             "of `fit` minus steps × that median.", "",
             "| size, batch | precision | model | img/s | speed against the command | `fit` beyond its steps, s |",
             "|---|---|---|---|---|---|", *rows]
    write_report(args.out, lines)
    return 0
