"""Does bfloat16 reach the quickstart's accuracy? float32 against mixed_bfloat16.

Runs the quickstart (README command 1: pretrain resnet9 on digits 0-4, then the
study of full+bn against scratch on 5-9 from 10 labels per class, 5 seeds) once
per precision, pretraining included, in a scratch folder, and compares the mean
test accuracy of each strategy. On CPUs without AVX512-BF16/AMX, bfloat16 is
emulated: slower, but the numbers still say whether it trains as well.

    python benchmarks/precision.py
Writes benchmarks/precision.md (or --out).
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tfxfer.runtime import describe_cpu  # noqa: E402

PRECISIONS = ("float32", "mixed_bfloat16")


def run_quickstart(precision, folder):
    tfxfer = os.path.join(os.path.dirname(sys.executable), "tfxfer")
    configs = os.path.join(ROOT, "configs")
    start = time.time()
    for command in (
        [tfxfer, "pretrain", "--config", os.path.join(configs, "quickstart-pretrain.yaml"), "--overwrite", "--precision", precision],
        [tfxfer, "study", "--config", os.path.join(configs, "quickstart.yaml"), "--precision", precision],
    ):
        subprocess.run(command, cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(folder, "studies", "quickstart", "results.csv")) as f:
        rows = list(csv.DictReader(f))
    by_strategy = {}
    for row in rows:
        by_strategy.setdefault(row["strategy"], []).append(float(row["test_accuracy"]))
    return by_strategy, time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "precision.md"))
    args = parser.parse_args()
    results = {}
    for precision in PRECISIONS:
        with tempfile.TemporaryDirectory() as folder:
            results[precision] = run_quickstart(precision, folder)
            print(precision, results[precision], flush=True)
    strategies = list(results[PRECISIONS[0]][0])
    lines = [
        "# bfloat16 against float32 on the quickstart", "",
        f"Machine: {describe_cpu()}.", "",
        "README command 1 (pretrain + study, 5 seeds), once per `--precision`. Test accuracy on the 180 test "
        "images of the digits 5-9, mean over seeds (each seed's value in brackets).", "",
        "| strategy | " + " | ".join(PRECISIONS) + " | bf16 − fp32 (points) |", "|---|---|---|---|",
    ]
    for s in strategies:
        a, b = (results[p][0][s] for p in PRECISIONS)
        lines.append(
            f"| {s} | {statistics.mean(a):.4f} {[round(x, 3) for x in a]} | {statistics.mean(b):.4f} "
            f"{[round(x, 3) for x in b]} | {100 * (statistics.mean(b) - statistics.mean(a)):+.1f} |"
        )
    lines += ["", "Wall time, pretrain + study: " + ", ".join(f"{p} {results[p][1]:.0f} s" for p in PRECISIONS) + ".",
              "", "Command: `python benchmarks/precision.py`", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
