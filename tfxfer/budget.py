"""`--time-budget`: how long a run may train, and how many epochs fit in it.

The budget is planned from real steps: the run's own training step is timed
(and undone) for a tenth of the budget, at most 30 s, the whole epochs that fit are fixed and saved in
the run's config, and a guard stops the run when an epoch would end well past
the budget (`tfxfer.callbacks.BudgetGuard`).
"""

import re
import time

import keras

from tfxfer.callbacks import BudgetGuard
from tfxfer.errors import TfxferError

__all__ = ["parse_duration", "plan_epochs", "measure_seconds_per_step", "time_budget_epochs", "budget_callbacks"]

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h|hr)?\s*$")


def parse_duration(text):
    """Seconds in `"90s"`, `"20m"`, `"1.5h"` (a bare number is seconds)."""
    match = _DURATION.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise TfxferError(f"Time budget {text!r} is not a duration; write it as 90s, 20m or 1.5h.")
    unit = (match.group(2) or "s")[0]
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[unit]


# Evaluating a batch costs about a third of a training step (forward only).
EVAL_STEP_SHARE = 1 / 3
# Timing the step takes this share of the budget, up to MEASURE_SECONDS: a
# short budget is not spent on measuring it.
MEASURE_SHARE = 0.1
MEASURE_SECONDS = 30.0


def plan_epochs(budget_seconds, seconds_per_step, steps_per_epoch, eval_steps_per_epoch=0, spent_seconds=0.0):
    """How many whole epochs fit in what is left of the budget (at least 1)."""
    per_epoch = seconds_per_step * (steps_per_epoch + EVAL_STEP_SHARE * eval_steps_per_epoch)
    return max(1, int((budget_seconds - spent_seconds) // per_epoch))


def measure_seconds_per_step(model, dataset, seconds=30.0, max_steps=500):
    """The mean time of a training step, over about `seconds` of real steps
    after one warm-up step. The model's and its optimizers' variables are put
    back afterwards, so the measurement trains nothing."""
    # The model's optimizer holds the backbone's own too (a MultiOptimizer).
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    variables = list(model.variables) + list(model.optimizer.variables)
    saved = [v.numpy() for v in variables]
    ends = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())
            if len(ends) > 2 and ends[-1] - ends[1] > seconds:
                self.model.stop_training = True

    model.fit(dataset.repeat(), steps_per_epoch=max_steps, epochs=1, callbacks=[Clock()], verbose=0, shuffle=False)
    for variable, value in zip(variables, saved):
        variable.assign(value)
    # The mean, not the median: wall time includes the occasional slow step
    # (measured: the median under-read a 20-minute run's steps by 30%).
    return (ends[-1] - ends[1]) / (len(ends) - 2) if len(ends) > 2 else ends[-1] - ends[0]


def budget_callbacks(config, started, resume, log=print):
    """`[BudgetGuard]` for a fresh run with a time budget, else `[]`."""
    if not config.optim.time_budget or resume:
        return []
    return [BudgetGuard(started + parse_duration(config.optim.time_budget), log)]


def time_budget_epochs(config, model, train, steps_per_epoch, eval_steps_per_epoch, started, log=print):
    """With `--time-budget`: measure the step and return the epochs that fit.
    `config` stays as it is: the caller puts the epochs in its run's copy
    (which config.yaml saves) and builds the schedule for them."""
    budget = parse_duration(config.optim.time_budget)
    seconds_per_step = measure_seconds_per_step(model, train, seconds=min(MEASURE_SECONDS, MEASURE_SHARE * budget))
    spent = time.time() - started
    epochs = plan_epochs(budget, seconds_per_step, steps_per_epoch, eval_steps_per_epoch, spent)
    log(
        f"time budget {config.optim.time_budget}: {seconds_per_step:.3f} s a step, {steps_per_epoch} steps an epoch, "
        f"{spent:.0f} s spent on start-up and measuring -> {epochs} epochs"
    )
    return epochs
