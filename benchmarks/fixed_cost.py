"""Where a tiny run's time goes: `tfxfer finetune --dataset digits --backbone simplecnn --weights none --epochs 1`
in a fresh process, split into its phases.

Everything outside the epoch is fixed cost that every run pays, a user's and
each of the test suite's alike. Each phase is timed by wrapping the function
that does it, in a child process started as the `tfxfer` command would be.
`--against DIR` times another checkout too (a clean clone of an earlier
commit, say), alternating round after round so both see the same machine.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks.harness import ROOT, stamp, write_report

COMMAND = ["finetune", "--dataset", "digits", "--backbone", "simplecnn", "--weights", "none", "--epochs", "1"]

# In the order a run goes through them: (phase, "module:attribute" of the functions that do it, in any
# checkout). A call inside another timed one counts for the outer phase only.
PHASES = [
    ("scan and load data", "tfxfer.runs:Run.load_data"),
    ("build and compile", "tfxfer.training:_build"),
    ("checkpoint", "tfxfer.callbacks:RunCheckpoint.on_epoch_end"),
    ("restore the best weights", "keras:Model.load_weights"),
    ("predict val and test", "tfxfer.training:predict_dataset"),
    ("plots", "tfxfer.training:_plot_run"),
    ("model.keras", "keras:Model.save"),
    ("backbone weights", "tfxfer.training:save_backbone"),
    ("float32 copy for the export", "tfxfer.training:at_precision"),
    ("SavedModel export", "tfxfer.training:export_saved_model tfxfer.training:write_saved_model"),
    ("export load-back check", "tfxfer.training:_round_trip"),
    ("model card", "tfxfer.training:write_model_card"),
]

CHILD = """
import time
started = time.perf_counter()
import importlib, json, sys
sys.argv[0] = "tfxfer"  # tfxfer sets itself up as the command does
root, phases, out, args = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
sys.path.insert(0, root)
import tfxfer.cli
import tensorflow, keras  # what the command imports before it works
spent = {"import": time.perf_counter() - started}

active = [0]

def timed(name, function):
    def wrapper(*a, **k):
        if active[0]:
            return function(*a, **k)
        active[0] += 1
        begun = time.perf_counter()
        try:
            return function(*a, **k)
        finally:
            active[0] -= 1
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - begun
    return wrapper

for name, wheres in phases:
    for where in wheres.split():
        module_name, attribute = where.split(":")
        owner = importlib.import_module(module_name)
        *path, last = attribute.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        if owner is not None and hasattr(owner, last):
            setattr(owner, last, timed(name, getattr(owner, last)))

from tfxfer import training

class Epochs(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.begun = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            spent["first step (traces)"] = spent.get("first step (traces)", 0.0) + time.perf_counter() - self.begun

    def on_epoch_end(self, epoch, logs=None):
        # Runs after the run's own callbacks: the checkpoint is inside, and taken out below.
        spent["epoch"] = spent.get("epoch", 0.0) + time.perf_counter() - self.begun

finetune = training.finetune
training.finetune = lambda config, callbacks=(), **k: finetune(config, callbacks=[*callbacks, Epochs()], **k)
try:
    tfxfer.cli.main(args, prog_name="tfxfer", standalone_mode=False)
finally:
    spent["epoch"] = spent.get("epoch", 0.0) - spent.get("first step (traces)", 0.0) - spent.get("checkpoint", 0.0)
    spent["total"] = time.perf_counter() - started
    json.dump(spent, open(out, "w"))
"""


def run_once(checkout, workdir, label):
    out = os.path.join(workdir, f"{label}.json")
    args = [*COMMAND, "--output-dir", os.path.join(workdir, label), "--overwrite", "--run-name", "r"]
    env = {**os.environ, "PYTHONPATH": checkout, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", CHILD, checkout, json.dumps(PHASES), out, json.dumps(args)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"the run in {checkout} failed:\n{done.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def main(argv, prog="python -m benchmarks fixed-cost"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each checkout; the median phase is reported")
    parser.add_argument("--against", help="another checkout of tfxfer to time the same way, alternating")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "fixed_cost.md"))
    options = parser.parse_args(argv)
    checkouts = {"this checkout": ROOT}
    if options.against:
        checkouts = {"against": os.path.abspath(options.against), **checkouts}
    results = {label: [] for label in checkouts}
    with tempfile.TemporaryDirectory() as workdir:
        for round_ in range(options.rounds):
            for i, (label, checkout) in enumerate(checkouts.items()):
                spent = run_once(checkout, workdir, f"c{i}")
                results[label].append(spent)
                print(f"round {round_ + 1}, {label}: {spent['total']:.1f} s", flush=True)

    def median(label, name):
        values = sorted(r.get(name, 0.0) for r in results[label])
        return values[len(values) // 2]

    names = ["import", PHASES[0][0], PHASES[1][0], "first step (traces)", "epoch", *(p for p, _ in PHASES[2:])]
    labels = list(checkouts)
    lines = stamp(f"{prog} --rounds {options.rounds}" + (f" --against {options.against}" if options.against else ""))
    lines += [f"`tfxfer {' '.join(COMMAND)}`, seconds per phase, the median of {options.rounds} runs in fresh "
              "processes" + (", the two checkouts alternating" if options.against else "") + ".", ""]
    if options.against:
        against = subprocess.run(["git", "-C", checkouts["against"], "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip() or "unknown"
        lines += [f"`against` is commit `{against}`.", ""]
    lines += ["| phase | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{median(label, name):.2f}" for label in labels) + " |")
    other = {label: median(label, "total") - sum(median(label, n) for n in names) for label in labels}
    lines.append("| everything else | " + " | ".join(f"{other[label]:.2f}" for label in labels) + " |")
    lines.append("| **total** | " + " | ".join(f"**{median(label, 'total'):.2f}**" for label in labels) + " |")
    lines.append("| outside the epoch | " + " | ".join(
        f"{median(label, 'total') - median(label, 'epoch'):.2f}" for label in labels) + " |")
    write_report(options.output, lines)
    return 0
