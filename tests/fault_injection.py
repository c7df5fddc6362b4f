"""Kill a run with SIGKILL at seeded random moments, continue it each time as a
user would, and compare the result with an unbroken run.

    python -m tests.fault_injection --command finetune --kills 12 --seed 3 --workdir /tmp/fi

Each attempt is a fresh process. It wraps the functions that begin a phase of
the run (data loading, a training step, checkpointing, evaluation, export,
saving the pretrained backbone, the study's report); when the drawn phase
begins for the drawn time, a timer SIGKILLs the process a drawn number of
milliseconds later. The phase the process is in when the signal fires is
recorded: a kill armed in one phase can land in the next, and then that
phase is armed again (at most RETRIES more times).

After the kills, the run is continued to its end (`--resume` where the folder
holds a run, the same command for a study) and must equal the unbroken run:
the same `history.csv` (a study: the same per-run histories and results), the
same final weights bit for bit (`--deterministic`), and no `tmp-*` file left.
"""

import argparse
import csv
import glob
import json
import os
import random
import subprocess
import sys
import textwrap

import h5py
import numpy as np

from tests.conftest import write_splits

PHASES = {
    # In the order a run goes through them, so that each kill's phase is still ahead.
    "finetune": ["data loading", "train step", "checkpointing", "train step", "evaluation", "export"],
    "pretrain": ["data loading", "train step", "checkpointing", "train step", "saving the backbone"],
    "study": ["data loading", "train step", "checkpointing", "evaluation", "export", "study report"],
}
# The longest delay after a phase begins, in milliseconds, drawn uniformly below it.
DELAY_MS = {"data loading": 300, "train step": 40, "checkpointing": 60, "evaluation": 60, "export": 800,
            "saving the backbone": 40, "study report": 400}
# How many more times a phase is armed when a kill meant for it landed elsewhere.
RETRIES = 2
COMMON = ["--backbone", "simplecnn", "--weights", "none", "--image-size", "32", "--epochs", "3", "--batch-size", "8",
          "--deterministic"]
OPTIONS = {
    "finetune": [*COMMON, "--seed", "3", "--l2sp", "0.01", "--augment", "flip_crop", "--run-name", "r"],
    "pretrain": [*COMMON, "--seed", "3", "--method", "simclr", "--run-name", "r"],
    "study": [*COMMON, "--strategies", "scratch,full", "--seeds", "3", "--name", "s"],
}

CHILD = textwrap.dedent("""
    import importlib, json, os, signal, sys, threading
    spec = json.loads(sys.argv[1])
    import keras, tfxfer
    from tfxfer import callbacks, pretraining, runs, training
    from tfxfer.cli import main
    study = importlib.import_module("tfxfer.studies")

    phase, seen = ["start"], {}

    def begin(name):
        phase[0] = name
        seen[name] = seen.get(name, 0) + 1
        if spec["target"] and spec["target"][0] == name and spec["target"][1] == seen[name]:
            def fire():
                with open(spec["landed"], "a") as f:
                    f.write(phase[0] + "\\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            threading.Timer(spec["target"][2] / 1000, fire).start()

    def marking(name, function):
        def wrapper(*args, **kwargs):
            begin(name)
            try:
                return function(*args, **kwargs)
            finally:
                phase[0] = "between phases"
        return wrapper

    runs.Run.load_data = marking("data loading", runs.Run.load_data)
    callbacks.RunCheckpoint.on_epoch_end = marking("checkpointing", callbacks.RunCheckpoint.on_epoch_end)
    training.predict_dataset = marking("evaluation", training.predict_dataset)
    training.write_saved_model = marking("export", training.write_saved_model)
    pretraining.save_backbone = marking("saving the backbone", pretraining.save_backbone)
    study.write_report = marking("study report", study.write_report)

    class Steps(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            begin("train step")

    for module, name in ((training, "finetune"), (pretraining, "pretrain")):
        def with_steps(config, callbacks=(), _run=getattr(module, name), **kwargs):
            return _run(config, callbacks=[*callbacks, Steps()], **kwargs)
        setattr(module, name, with_steps)
    main(spec["args"], prog_name="tfxfer")
""")


def _child(args, target, landed, cwd):
    spec = {"args": args, "target": target, "landed": landed}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # sys.argv[0] "tfxfer": tfxfer loads as the command does.
    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def _args(command, data, output_dir, folder):
    args = [command, *OPTIONS[command], "--data-dir", data, "--output-dir", output_dir]
    if command != "study" and os.path.exists(os.path.join(folder, "config.yaml")):
        args.append("--resume")  # what a user types after a crash
    return args


def drive(command, workdir, kills=5, seed=0, log=print):
    """Run `command` unbroken and with `kills` kills; returns the report
    `{"kills": [(armed phase, landed phase)], "mismatches": [...], "leftovers": [...]}`."""
    rng = random.Random(seed)
    data = write_splits(os.path.join(workdir, "data"), train=12, test=4)
    name = "s" if command == "study" else "r"
    dirs = {kind: os.path.join(workdir, kind) for kind in ("unbroken", "broken")}
    unbroken = _child(_args(command, data, dirs["unbroken"], ""), None, "", workdir)
    if unbroken.returncode != 0:
        raise RuntimeError(f"the unbroken {command} failed:\n{unbroken.stderr[-3000:]}")

    folder = os.path.join(dirs["broken"], name)
    landed_file = os.path.join(workdir, f"landed-{command}.txt")
    report = {"kills": [], "mismatches": [], "leftovers": []}
    phases = PHASES[command]
    armed_count = 0
    while armed_count < kills:
        armed = phases[armed_count % len(phases)]
        # A kill can land after its phase ended; it still counts (the run must survive it), and the
        # phase is armed again, a few times at most, so that each phase is really hit.
        for _ in range(1 + RETRIES):
            occurrence = rng.randint(1, 6) if armed == "train step" else rng.randint(1, 2) if armed == "evaluation" else 1
            target = [armed, occurrence, rng.uniform(0, DELAY_MS[armed])]
            result = _child(_args(command, data, dirs["broken"], folder), target, landed_file, workdir)
            if result.returncode != -9:
                raise RuntimeError(f"{command} armed to die in {armed} exited {result.returncode}:\n"
                                   f"{result.stdout[-1500:]}\n{result.stderr[-3000:]}")
            with open(landed_file) as f:
                landed = f.read().splitlines()[-1]
            report["kills"].append((armed, landed))
            log(f"{command}: kill {len(report['kills'])} armed in {armed} (#{occurrence}, {target[2]:.0f} ms), "
                f"landed in {landed}")
            if landed == armed:
                break
        armed_count += 1
    finished = _child(_args(command, data, dirs["broken"], folder), None, "", workdir)
    if finished.returncode != 0:
        raise RuntimeError(f"{command} after the kills failed:\n{finished.stdout[-1500:]}\n{finished.stderr[-3000:]}")
    report["mismatches"] = compare(command, os.path.join(dirs["unbroken"], name), folder)
    report["leftovers"] = [os.path.join(d, f) for d, subdirs, files in os.walk(folder)
                           for f in files + subdirs if f.startswith("tmp-")]
    return report


def compare(command, expected, got):
    """What differs between two finished runs (or studies), as readable lines."""
    if command == "study":
        mismatches = []
        for run in sorted(os.listdir(os.path.join(expected, "runs"))):
            mismatches += compare("finetune", os.path.join(expected, "runs", run), os.path.join(got, "runs", run))
        timing = {"wall_time_seconds", "train_images_per_second"}
        rows = [[{k: v for k, v in r.items() if k not in timing} for r in _csv(os.path.join(d, "results.csv"))]
                for d in (expected, got)]
        return mismatches + (["results.csv differs"] if rows[0] != rows[1] else [])
    mismatches = []
    if _read(expected, "history.csv") != _read(got, "history.csv"):
        mismatches.append(f"{got}: history.csv differs")
    weights = "backbone.weights.h5" if command == "pretrain" else "best.weights.h5"
    for path in (weights, os.path.join("checkpoint", "state.json")):
        if not os.path.exists(os.path.join(got, path)):
            mismatches.append(f"{got}: no {path}")
    a, b = _h5(os.path.join(expected, weights)), _h5(os.path.join(got, weights))
    if a.keys() != b.keys() or any(not np.array_equal(a[k], b[k]) for k in a):
        mismatches.append(f"{got}: {weights} differs")
    if command == "finetune" and sorted(os.listdir(os.path.join(got, "export"))) != ["1"]:
        mismatches.append(f"{got}: export/ holds {sorted(os.listdir(os.path.join(got, 'export')))}, not one version")
    return mismatches


def _read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return f.read()


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _h5(path):
    arrays = {}
    if os.path.exists(path):
        with h5py.File(path, "r") as f:
            f.visititems(lambda key, item: arrays.__setitem__(key, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--command", choices=sorted(PHASES), action="append")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", required=True)
    options = parser.parse_args()
    for command in options.command or sorted(PHASES):
        report = drive(command, os.path.join(options.workdir, command), options.kills, options.seed)
        print(json.dumps({"command": command, **report}, indent=1))


if __name__ == "__main__":
    main()
