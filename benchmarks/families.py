"""ViT-B/16 and ConvNeXt-T full fine-tuning against PyTorch eager with timm's models.

Both sides train the same architecture from random weights, 10-class head, SGD
with momentum 0.9, on one cached random batch of 224 px uint8 images: tfxfer
(`build_model`, Keras's `fit`, the speed-ups `tfxfer finetune` applies) and
the classic PyTorch eager loop over `timm.create_model` (`torch.autocast` for
bfloat16). The PyTorch side runs in a virtual environment of its own,
`benchmarks/.timm-venv`, which the benchmark makes and fills with
`pip install timm` when it is missing (timm needs torchvision, which need not
match the torch that tfxfer's other benchmarks use).
Every cell is a process of its own; cells alternate round after round.

    python -m benchmarks families                 # float32, and bfloat16 where the CPU has it
Writes benchmarks/families.md (or --out).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

from benchmarks.harness import ROOT, child_result, quiet_tensorflow, run_child, stamp, write_report

# tfxfer registry name -> timm model name (the same architecture)
FAMILIES = {"vit_b16": "vit_base_patch16_224", "convnext_tiny": "convnext_tiny"}
WARMUP = 3


def child_step(side, family, size, batch, steps, precision):
    if side == "torch":
        return _torch_step(family, size, batch, steps, precision)
    quiet_tensorflow()
    import keras

    import tfxfer
    from benchmarks.suite import _keras_rate
    from tfxfer import speedups

    if precision != "float32":
        keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    model = tfxfer.build_model(family, num_classes=10, weights=None, image_size=size, freeze="full")
    model.compile(keras.optimizers.SGD(0.001, momentum=0.9), "sparse_categorical_crossentropy")
    with speedups.applied(model, log=lambda line: None):
        rate = _keras_rate(model, size, batch, steps)
    return {"images_per_second": rate, "params": int(model.count_params())}


def timm_training_step(family, size, batch, precision, phase=None):
    """`(step, model)`: the classic eager step over timm's model on one random
    batch (zero_grad, forward, loss, backward, SGD step); `phase`, a `name ->
    context manager` factory such as `torch.profiler.record_function`, labels
    its forward, backward and optimizer parts."""
    import contextlib

    import torch

    phase = phase or (lambda name: contextlib.nullcontext())
    torch.manual_seed(0)
    model = create_timm_model(family, size)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
    labels = torch.arange(batch) % 10

    def step():
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # the same preprocessing work as the TF side
        optimizer.zero_grad(set_to_none=True)
        with phase("forward"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float32"):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer.step()

    return step, model


def _torch_step(family, size, batch, steps, precision):
    import timm
    import torch

    step, model = timm_training_step(family, size, batch, precision)
    times = []
    for _ in range(steps + WARMUP):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"images_per_second": batch / statistics.median(times[WARMUP:]),
            "params": sum(p.numel() for p in model.parameters()), "versions": f"torch {torch.__version__}, timm {timm.__version__}"}


def create_timm_model(family, size):
    """timm's model of the registry entry `family`, from random weights, 10 classes."""
    import timm

    options = {"img_size": size} if family.startswith("vit") else {}
    return timm.create_model(FAMILIES[family], pretrained=False, num_classes=10, **options)


TIMM_VENV = os.path.join(ROOT, "benchmarks", ".timm-venv")


def ensure_timm():
    """The Python of the timm environment, made on first use."""
    python = os.path.join(TIMM_VENV, "bin", "python")
    if subprocess.run([python, "-c", "import timm"], capture_output=True).returncode if os.path.exists(python) else True:
        print(f"making {TIMM_VENV} with timm (pip install timm) for the PyTorch side", flush=True)
        subprocess.run([sys.executable, "-m", "venv", TIMM_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "timm", "numpy"], check=True)
    return python


def main(argv, prog="python -m benchmarks families"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--side")
    parser.add_argument("--family")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "families.md"))
    args = parser.parse_args(argv)
    if args.child:
        return child_result(child_step(args.side, args.family, args.size, args.batch, args.steps, args.precision))

    from benchmarks.suite import has_bf16
    from tfxfer.runtime import cpu_flags

    timm_python = ensure_timm()
    precisions = ("float32", "mixed_bfloat16") if has_bf16(cpu_flags()) else ("float32",)
    cells = [(f, p, s) for f in args.families.split(",") for p in precisions for s in ("tfxfer", "torch")]
    rates, params, versions = {}, {}, "PyTorch side not run"
    for r in range(args.rounds):
        for family, precision, side in (cells if r % 2 == 0 else list(reversed(cells))):
            result = run_child("families", "step", "--side", side, "--family", family, "--precision", precision,
                               "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
                               python=timm_python if side == "torch" else None)
            rates.setdefault((family, precision, side), []).append(result["images_per_second"])
            params[(family, side)] = result["params"]
            versions = result.get("versions", versions)
            print(family, precision, side, f"{result['images_per_second']:.2f}", flush=True)

    def rate(*key):
        return statistics.median(rates[key])

    lines = ["# ViT-B/16 and ConvNeXt-T against timm", "", *stamp(f"{prog} {' '.join(argv)}".strip()),
             f"Full fine-tune from random weights at {args.size} px, batch {args.batch}, SGD momentum; {args.rounds} "
             "alternating rounds, each cell a process of its own; img/s = batch / median step time after 3 warm-up "
             f"steps, median over rounds. PyTorch side: {versions}, in {os.path.relpath(TIMM_VENV, ROOT)}.", "",
             "| model | precision | tfxfer img/s | timm (PyTorch eager) img/s | tfxfer / timm | tfxfer bf16 / fp32 | "
             "params (tfxfer / timm) |",
             "|---|---|---|---|---|---|---|"]
    for family in args.families.split(","):
        for precision in precisions:
            ours, theirs = rate(family, precision, "tfxfer"), rate(family, precision, "torch")
            speedup = f"{ours / rate(family, 'float32', 'tfxfer'):.2f}×" if precision != "float32" else "–"
            lines.append(f"| {family} | {precision} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}× | {speedup} | "
                         f"{params[(family, 'tfxfer')]:,} / {params[(family, 'torch')]:,} |")
    write_report(args.out, lines)
