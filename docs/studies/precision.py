"""Does bfloat16 reach the quickstart's accuracy? float32 against mixed_bfloat16.

Runs the quickstart (README command 1: pretrain resnet9 on digits 0-4, then the
study of full+bn against scratch on 5-9 from 10 labels per class, 5 seeds) once
per precision, pretraining included, in a scratch folder, and compares the mean
test accuracy of each strategy. On CPUs without AVX512-BF16/AMX, bfloat16 is
emulated: slower, but the numbers still say whether it trains as well.

    python docs/studies/precision.py
    python docs/studies/precision.py --study configs/precision-digits.yaml --out docs/studies/precision-digits.md

With `--study CONFIG`, runs that study alone once per precision instead, and
reports the paired difference per seed with a 95% t-interval: the check that
can resolve one point where the quickstart's seed noise cannot.
Writes docs/studies/precision-quickstart.md (or --out).
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def run_study(precision, folder, config):
    tfxfer = os.path.join(os.path.dirname(sys.executable), "tfxfer")
    start = time.time()
    subprocess.run([tfxfer, "study", "--config", os.path.abspath(config), "--precision", precision], cwd=folder,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    found = [os.path.join(r, "results.csv") for r, _, files in os.walk(os.path.join(folder, "studies")) if "results.csv" in files]
    with open(found[0]) as f:
        rows = list(csv.DictReader(f))
    return {row["seed"]: float(row["test_accuracy"]) for row in rows}, time.time() - start


def paired_study(config, out):
    from scipy import stats

    results = {}
    for precision in PRECISIONS:
        with tempfile.TemporaryDirectory() as folder:
            results[precision] = run_study(precision, folder, config)
            print(precision, results[precision], flush=True)
    (fp32, t32), (bf16, t16) = (results[p] for p in PRECISIONS)
    seeds = sorted(fp32, key=int)
    differences = [100 * (bf16[s] - fp32[s]) for s in seeds]
    mean = statistics.mean(differences)
    low, high = stats.t.interval(0.95, len(differences) - 1, loc=mean, scale=stats.sem(differences)) if len(differences) > 1 else (mean, mean)
    lines = [
        "# bfloat16 against float32, paired by seed", "",
        f"Machine: {describe_cpu()}.", "",
        f"`tfxfer study --config {config}` once per `--precision`; test accuracy per seed.", "",
        "| seed | float32 | mixed_bfloat16 | bf16 − fp32 (points) |", "|---|---|---|---|",
        *[f"| {s} | {fp32[s]:.4f} | {bf16[s]:.4f} | {d:+.2f} |" for s, d in zip(seeds, differences)], "",
        f"**Mean difference {mean:+.2f} points, 95% CI {low:+.2f} to {high:+.2f}** ({len(seeds)} seeds, t-interval); "
        f"float32 mean {100 * statistics.mean(fp32.values()):.2f}%, bfloat16 {100 * statistics.mean(bf16.values()):.2f}%.", "",
        f"Wall time: float32 {t32:.0f} s, mixed_bfloat16 {t16:.0f} s.", "",
        f"Command: `python docs/studies/precision.py --study {config} --out {os.path.relpath(out, ROOT)}`", "",
    ]
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "studies", "precision-quickstart.md"))
    parser.add_argument("--study", help="A study config to run once per precision, paired by seed.")
    args = parser.parse_args()
    if args.study:
        return paired_study(args.study, args.out)
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
              "", "Command: `python docs/studies/precision.py`", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
