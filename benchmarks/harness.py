"""What every benchmark shares: the machine line, timing, alternating rounds and the report.

Every table a benchmark writes starts with `stamp()`: the commit and the CPU it
was measured on, because figures from one CPU say little about another.
Comparisons are made as ratios within one run: contenders alternate round
after round, so a machine that slows down (a shared 2-core machine can lose
30% within a minute) slows every contender alike.
"""

import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit():
    """The checkout's commit, with `+changes` when the work tree differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def stamp(command):
    """The lines every benchmark table starts with: commit, CPU, versions, the command that made it."""
    import keras
    import tensorflow as tf

    from tfxfer.runtime import describe_cpu, onednn_enabled

    return [f"Commit `{commit()}`, {time.strftime('%Y-%m-%d')}. CPU: **{describe_cpu()}**. "
            f"TensorFlow {tf.__version__} (oneDNN {'on' if onednn_enabled() else 'off'}), Keras {keras.__version__}.", "",
            f"Command: `{command}`", ""]


def quiet_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def random_batches(size, batch, batches=4, seed=0):
    """An endless `tf.data` of `batches` cached batches of random uint8 images and 10 labels."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch * batches, size, size, 3), np.uint8)
    labels = rng.integers(0, 10, batch * batches).astype("int32")
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch).cache().repeat()


def median_step_seconds(model, batches, steps, warmup):
    """The median time of `steps` calls of the model's compiled train function, after `warmup` calls."""
    for _ in range(warmup):
        model.train_function(batches)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        float(model.train_function(batches)["loss"])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternating_rounds(models, rounds, steps, warmup=1):
    """`{name: [median step seconds, one per round]}` for `{name: (model, batch iterator)}`,
    timed in turn, forward then backward order, round after round."""
    times = {name: [] for name in models}
    for r in range(rounds):
        for name in (list(models) if r % 2 == 0 else list(reversed(models))):
            times[name].append(median_step_seconds(*models[name], steps, warmup=warmup))
    return times


def call_latencies(runners, example, warmup, repeats, rounds):
    """`{name: [seconds of each call]}` of `{name: callable}` on `example`:
    `warmup` calls each, then `repeats` calls each in `rounds` rounds that
    alternate between the callables, so a change in the machine's speed hits
    them all alike."""
    for run in runners.values():
        for _ in range(warmup):
            run(example)
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            for _ in range(repeats // rounds):
                start = time.perf_counter()
                run(example)
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(a, b):
    """The median over rounds of a's time / b's time in the same round."""
    return statistics.median(x / y for x, y in zip(a, b))


def run_child(benchmark, *argv, env=None, python=None):
    """Run `python -m benchmarks BENCHMARK --child ...` in a fresh process and return the
    JSON it prints on its `RESULT` line: each contender gets a process of its own
    (`python`: another environment's interpreter)."""
    out = subprocess.run([python or sys.executable, "-m", "benchmarks", benchmark, "--child", *argv], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, **(env or {})})
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"benchmark child {benchmark} {' '.join(argv)} failed:\n{out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def child_result(result):
    print("RESULT " + json.dumps(result), flush=True)


def write_report(path, lines):
    text = "\n".join(lines).rstrip("\n") + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(text)
