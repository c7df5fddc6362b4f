"""bfloat16 against float32 and against PyTorch, with BatchNorm frozen and training.

ResNet50 from random weights, full fine-tune + L2-SP 0.01 over the kernels, SGD
with momentum 0.9, on one cached random batch: tfxfer (`build_model`, Keras's
`fit`, the speed-ups `tfxfer finetune` applies) and the classic PyTorch eager
loop (`torch.autocast` for bfloat16). BatchNorm is in the same mode on both
sides: frozen per layer (inference mode, tfxfer's default for pretrained
weights) or training (batch statistics, the default from random weights).
Every cell is a process of its own (the suite's children); cells alternate
round after round. The last column relates the step's arithmetic to the
matmul peak measured in the same precision.

    python -m benchmarks bfloat16                      # 224 px at 16 and 32 px at 64, 2 rounds
Writes benchmarks/bfloat16.md (or --out).
"""

import argparse
import os
import statistics

from benchmarks.harness import ROOT, run_child, stamp, write_report

SIDES = ("tfxfer", "torch")
CONTENDER = {"tfxfer": "tfxfer full+L2-SP", "torch": "torch eager full+L2-SP"}
PRECISIONS = ("mixed_bfloat16", "float32")
BN_MODES = ("frozen", "training")


def main(argv, prog="python -m benchmarks bfloat16"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224:16:5,32:64:15", help="size:batch:timed steps triples")
    parser.add_argument("--bn", default=",".join(BN_MODES), help="frozen, training or both")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "bfloat16.md"))
    args = parser.parse_args(argv)
    peaks = {p: run_child("suite", "matmul", "--dtype", "bfloat16" if p == "mixed_bfloat16" else "float32")["flops"]
             for p in PRECISIONS}
    rows = [(tuple(int(v) for v in triple.split(":")), bn, precision)
            for triple in args.sizes.split(",") for bn in args.bn.split(",") for precision in PRECISIONS]
    cells = [(*row, side) for row in rows for side in SIDES]
    rates, flops = {}, {}
    for r in range(args.rounds):
        for (size, batch, steps), bn, precision, side in (cells if r % 2 == 0 else list(reversed(cells))):
            result = run_child("suite", "step", "--contender", CONTENDER[side], "--size", str(size), "--batch", str(batch),
                               "--steps", str(steps), "--precision", precision, *(["--train-bn"] if bn == "training" else []))
            rates.setdefault((size, bn, precision, side), []).append(result["images_per_second"])
            flops.setdefault(size, result.get("forward_flops"))
            print(size, bn, precision, side, f"{result['images_per_second']:.1f}", flush=True)

    def rate(*key):
        return statistics.median(rates[key])

    lines = ["# bfloat16 against float32 and PyTorch", "", *stamp(f"{prog} {' '.join(argv)}".strip()),
             f"ResNet50 full fine-tune + L2-SP 0.01, SGD momentum; {args.rounds} alternating rounds, each cell a process "
             "of its own; img/s = batch / median step time after 3 warm-up steps, median over rounds. BatchNorm is in "
             "the same mode on both sides of a row. Matmul peak (2048², TensorFlow): "
             + ", ".join(f"{p} {peaks[p] / 1e9:.0f} GFLOP/s" for p in PRECISIONS) + ".", "",
             "| size, batch | BatchNorm | precision | tfxfer img/s | PyTorch img/s | tfxfer / PyTorch | "
             "tfxfer bf16 / fp32 | tfxfer share of the matmul peak |",
             "|---|---|---|---|---|---|---|---|"]
    for (size, batch, _), bn, precision in rows:
        mine, theirs = rate(size, bn, precision, "tfxfer"), rate(size, bn, precision, "torch")
        speedup = f"{mine / rate(size, bn, 'float32', 'tfxfer'):.2f}×" if precision != "float32" else "–"
        # Training is taken as 3x the forward pass's FLOPs (2 x multiply-adds of convolutions and dense layers).
        share = f"{3 * flops[size] * mine / peaks[precision]:.0%}" if flops.get(size) else "–"
        lines.append(f"| {size} px, {batch} | {bn} | {precision} | {mine:.1f} | {theirs:.1f} | **{mine / theirs:.2f}×** | "
                     f"{speedup} | {share} |")
    lines += ["", "Per round: " + "; ".join(f"{size} {bn} {precision} {side}: " + ", ".join(f"{v:.1f}" for v in values)
                                         for (size, bn, precision, side), values in rates.items()), ""]
    write_report(args.out, lines)
