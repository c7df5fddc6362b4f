"""LoRA against full and head-only fine-tuning: training speed and peak memory.

One backbone from the registry, built from random weights (`weights="none"`)
with a 10-class head, trained three ways on cached random uint8 images:

* `full`: every weight trains (`freeze="full"`);
* `lora:R`: adapters of rank R on the registry's target layers, and the head
  (`lora=R`);
* `head`: the head alone, through the backbone (`freeze="head"`, no feature
  cache).

Each is compiled with Keras's SGD with momentum 0.9 (one slot a trainable
weight) and runs the training step `tfxfer finetune` runs, the CPU speed-ups
applied. Every setup runs in a process of its own, so that the peak resident
memory of one is not the peak of another; the processes alternate round
after round (full, lora, head, then head, lora, full, ...).

    python -m benchmarks lora                         # vit_b16, 224 px, batch 16, rank 8
Writes benchmarks/lora.md (or --output).
"""

import argparse
import os
import resource
import statistics

from benchmarks.harness import ROOT, child_result, median_step_seconds, quiet_tensorflow, random_batches, run_child, stamp, write_report

SETUPS = ("full", "lora", "head")
# The first call traces the step; the second runs it once traced.
WARMUP = 2


def _peak_mib():
    """The process's peak resident memory so far, in MiB (`ru_maxrss` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mib(variables):
    import numpy as np

    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables) / 2**20


def child(backbone, setup, size, batch, rank, precision, steps):
    """Build, compile and train one setup in this process; print its figures on a `RESULT` line."""
    quiet_tensorflow()
    import keras
    import numpy as np

    import tfxfer

    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    options = {"lora": rank} if setup == "lora" else {"freeze": setup}
    model = tfxfer.build_model(backbone, num_classes=10, weights="none", image_size=size, **options)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
    batches = iter(random_batches(size, batch))
    built = _peak_mib()
    model.training_speedups(log=lambda line: None)  # on for the life of this process, as for a run
    model.make_train_function()
    seconds = median_step_seconds(model, batches, steps, warmup=WARMUP)
    child_result({
        "images_per_second": batch / seconds,
        "built_mib": built,
        "peak_mib": _peak_mib(),
        "trainable": sum(int(np.prod(w.shape)) for w in model.trainable_weights),
        "total": int(model.count_params()),
        "optimizer_mib": _mib(model.optimizer.variables),
    })


def _median_round(results):
    """The round whose img/s is the median (the lower of the two middle ones for an even count)."""
    rates = [r["images_per_second"] for r in results]
    return results[rates.index(statistics.median_low(rates))]


def main(argv, prog="python -m benchmarks lora"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_b16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--precision", choices=("float32", "mixed_bfloat16"),
                        help="default: float32, and mixed_bfloat16 where this CPU has bfloat16 arithmetic")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process, after 2 warm-up steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=SETUPS, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "lora.md"))
    args = parser.parse_args(argv)
    if args.child:
        return child(args.backbone, args.child, args.size, args.batch, args.rank, args.precision, args.steps)

    from tfxfer.runtime import has_bf16

    native = has_bf16()
    if args.precision == "mixed_bfloat16" and not native:
        print("This CPU has no native bfloat16 arithmetic (AMX-BF16, AVX512-BF16 or Arm BF16), so bfloat16 timings "
              "would measure its emulation; run with --precision float32.")
        return 2
    precisions = [args.precision] if args.precision else ["float32"] + (["mixed_bfloat16"] if native else [])
    cells = [(p, s) for p in precisions for s in SETUPS]
    shared = ["--backbone", args.backbone, "--size", str(args.size), "--batch", str(args.batch),
              "--rank", str(args.rank), "--steps", str(args.steps)]
    results = {cell: [] for cell in cells}
    for r in range(args.rounds):
        for precision, setup in (cells if r % 2 == 0 else list(reversed(cells))):
            result = run_child("lora", setup, "--precision", precision, *shared)
            results[(precision, setup)].append(result)
            print(precision, setup, f"{result['images_per_second']:.2f} img/s, peak {result['peak_mib']:.0f} MiB",
                  flush=True)

    def name(setup):
        return f"lora:{args.rank}" if setup == "lora" else setup

    rows = []
    for precision in precisions:
        full = [r["images_per_second"] for r in results[(precision, "full")]]
        for setup in SETUPS:
            runs = results[(precision, setup)]
            rate = statistics.median(r["images_per_second"] for r in runs)
            ratio = statistics.median(r["images_per_second"] / f for r, f in zip(runs, full))
            middle = _median_round(runs)
            rows.append(f"| {precision} | {name(setup)} | {middle['trainable']:,} | {middle['optimizer_mib']:.2f} | "
                        f"{rate:.2f} | {ratio:.2f}× | {middle['built_mib']:,.0f} | {middle['peak_mib']:,.0f} | "
                        f"{middle['peak_mib'] - middle['built_mib']:,.0f} |")
    total = results[cells[0]][0]["total"]
    lines = [f"# LoRA against full and head-only fine-tuning ({args.backbone})", "",
             *stamp(f"{prog} {' '.join(argv)}".strip()),
             f"{args.backbone} from random weights ({total:,} parameters), 10-class head, {args.size} px, batch "
             f"{args.batch}; Keras's SGD with momentum 0.9, the CPU speed-ups applied; random uint8 images. Each setup "
             f"in a process of its own, {args.rounds} alternating round{'s' if args.rounds != 1 else ''}; img/s = batch / median of {args.steps} step "
             f"times after {WARMUP} warm-up steps (the first traces), median over rounds; against `full`: the median "
             "of the per-round ratios.", "",
             "| precision | setup | trainable params | optimizer variables, MiB | img/s | against full | "
             "peak RSS built, MiB | peak RSS trained, MiB | growth in training, MiB |",
             "|---|---|---|---|---|---|---|---|---|", *rows, "",
             "Peak RSS (`ru_maxrss`) of the setup's process from the round of its median img/s: once the model is "
             "built and compiled (imports included), and after the timed steps; the growth is what training adds: "
             "activations kept for the backward pass, gradients and the optimizer's momentum slots."]
    write_report(args.output, lines)
    return 0
