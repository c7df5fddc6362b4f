"""`study`: fine-tuning strategies x seeds (x folds), each an ordinary run, then
statistics and plots that say how sure the comparison is.

A study folder `studies/<name>/` holds:
    study.yaml          the shared options (a re-run must match them)
    runs/<run>/         one finetune run folder per strategy, seed and fold; only the
                        run best on validation of each strategy keeps its export/
                        (all of them with --keep-exports all)
    commands.txt        each run as a plain `tfxfer finetune` command
    results.csv         one row per run: every metric
    report.md           mean ± sd, 95% CI, paired tests against scratch and full
    bar_chart.png, learning_curves.png, confusion_matrix.png, top_losses.png

Every strategy gets the same budget: the same epochs, or the same time budget.
Re-running a study skips finished runs (they have `metrics.json`) and resumes
an interrupted one from its checkpoint, so a study killed halfway loses at most
the epoch in progress.
"""

import contextlib
import csv
import dataclasses
import glob
import io
import os

import keras
import numpy as np
import yaml

from tfxfer import atomic, owned, runs, tracking, training
from tfxfer.backbones.pretrained import with_pretrained_spec
from tfxfer.config import FinetuneConfig, StudyConfig, config_from_flat
from tfxfer.errors import TfxferError
from tfxfer.reporting import plots
from tfxfer.reporting.stats import describe, paired, summarize
from tfxfer.strategies import command_line, expand, parse_strategies
from tfxfer.data import load_splits
from tfxfer.training import PREDICTIONS

__all__ = ["study", "StudyResult", "METRIC"]

METRIC = "test_accuracy"  # what the report compares
STUDY_FILE = "study.yaml"
TOP_LOSSES = 16


@dataclasses.dataclass
class StudyResult:
    study_dir: str
    rows: list
    report_path: str


def study(config, log=print, verbose=2):
    """Run (or continue) the study `config` (a `StudyConfig`); returns a `StudyResult`."""
    if not isinstance(config, StudyConfig):
        raise TypeError("study() takes a StudyConfig; build one with tfxfer.load_config(path, kind=StudyConfig).")
    # Backbone and image size of a pretrained source, for scratch too: in the study's own copy.
    config = with_pretrained_spec(config.validate())
    strategies = parse_strategies(config.study.strategies)
    seeds = config.study.seed_list()
    folds = list(range(config.data.folds)) if config.data.folds else [None]
    name = config.study.name or runs.default_run_name(config)
    runs.check_run_name(name, "--name")
    study_dir = os.path.join(config.run.output_dir, name)
    shared = _shared_options(config, study_dir)
    _require_test_split(config)
    tracking.check_reachable(config)
    # One process runs a study at a time: a second would run the same runs and
    # write the same report.
    lock = runs.RunFolderLock(study_dir)
    if os.path.isdir(study_dir) and not lock.try_acquire(create=False):
        raise runs.in_use(study_dir, lock, "Study folder", "--name")
    try:
        _check_saved(study_dir, shared)
        if not lock.try_acquire(create=True):
            raise runs.in_use(study_dir, lock, "Study folder", "--name")
        lock.stamp()
        runs.remove_leftovers(study_dir)  # a killed study's half-written report or plots
        return _run_study(config, name, study_dir, shared, strategies, seeds, folds, log, verbose)
    finally:
        lock.release()


def _run_study(config, name, study_dir, shared, strategies, seeds, folds, log, verbose):
    planned = [(s, seed, fold) for s in strategies for seed in seeds for fold in folds]
    log(f"study {name}: {len(strategies)} strategies x {len(seeds)} seeds"
        + (f" x {len(folds)} folds" if config.data.folds else "") + f" = {len(planned)} runs in {study_dir}")
    tracker = tracking.open_tracker(config, study_dir, resume=True, tags={"strategies": config.study.strategies}, log=log)
    with tracking.ending(tracker):
        rows, commands = _run_all(planned, shared, study_dir, log, verbose, tracker)
        if config.study.keep_exports == "best":
            _keep_best_exports(study_dir, rows, strategies, log)
        atomic.write_text(os.path.join(study_dir, "commands.txt"), "\n".join(commands) + "\n")
        _write_csv(os.path.join(study_dir, "results.csv"), rows)
        report_path, summary = write_report(study_dir, rows, commands, strategies, seeds, config, name)
        if tracker:
            for strategy in strategies:
                own = [r["test_accuracy"] for r in rows if r["strategy"] == strategy]
                tracker.log_metrics({f"test_accuracy_mean.{_slug(strategy)}": np.mean(own)}, 0)
            names = ("report.md", "results.csv", "commands.txt", "study.yaml")
            tracker.log_artifacts([os.path.join(study_dir, n) for n in names] + sorted(glob.glob(os.path.join(study_dir, "*.png"))))
            tracker.finish()
    log("\n".join(summary))
    log(f"study {name}: results.csv, report.md and plots in {study_dir}")
    return StudyResult(study_dir, rows, report_path)


def _run_all(planned, shared, study_dir, log, verbose, tracker):
    """Every planned run (nested under `tracker`'s MLflow run when tracking): `(rows, commands)`."""
    rows, commands = [], []
    # Every run's options checked before the first trains: a probe refuses a shared --calibrate or --ema.
    configs = [_run_config(shared, *plan).validate() for plan in planned]
    for i, ((strategy, seed, fold), run_config) in enumerate(zip(planned, configs), 1):
        command = command_line({k: v for k, v in run_config.flat().items() if k != "strategy"}, FinetuneConfig.defaults())
        commands.append(command)
        log(f"[{i}/{len(planned)}] {run_config.run.run_name}: {command}")
        run_dir = os.path.join(run_config.run.output_dir, run_config.run.run_name)
        metrics = _run_once(run_config, run_dir, log, verbose, tracker.run_id if tracker else None)
        rows.append(_row(strategy, seed, fold, metrics, os.path.relpath(run_dir, study_dir)))
    return rows, commands


def _shared_options(config, study_dir):
    """The finetune options every run shares: the study's own, minus what each run sets."""
    finetune_keys = FinetuneConfig.fields()
    shared = {k: v for k, v in config.flat().items() if k in finetune_keys and k not in StudyConfig.OWNED}
    shared["output_dir"] = os.path.join(study_dir, "runs")
    return shared


def _check_saved(study_dir, shared):
    """A re-run continues the study only with the same shared options."""
    path = os.path.join(study_dir, STUDY_FILE)
    if os.path.exists(path):
        with open(path) as f:
            saved = yaml.safe_load(f) or {}
        # Whether a leak stops a run changes no result: a study stopped by one goes on with --allow-leaks.
        changed = [k for k in sorted(shared) if k in saved and saved[k] != shared[k] and k != "allow_leaks"]
        if changed:
            described = ", ".join(f"{k} {shared[k]} (saved: {saved[k]})" for k in changed)
            raise TfxferError(
                f"Study {study_dir} was run with other options ({described}); its runs would not compare. "
                "Use the saved options or another --name."
            )
        return
    os.makedirs(study_dir, exist_ok=True)
    atomic.write_text(path, yaml.safe_dump(shared, sort_keys=False))


def _require_test_split(config):
    data = config.data
    _, info = load_splits(
        **data.source(), image_size=32, val_fraction=data.val_fraction, tfds_data_dir=data.tfds_data_dir,
        train_split=data.train_split, val_split=data.val_split, test_split=data.test_split,
        max_train_examples=data.max_train_examples, classes=data.classes, labels_per_class=data.labels_per_class,
        folds=data.folds,
    )
    if "test" not in info.num_examples:
        raise TfxferError(
            f"A study compares strategies on a test split, and {info.name} has none; use a folder with test/ "
            "or a dataset with a test split."
        )


def _slug(strategy):
    """A strategy as a folder (and MLflow metric) name: l2sp@0.01+bn -> l2sp0.01-bn."""
    return strategy.replace("@", "").replace("+", "-").replace(":", "").replace("=", "")


def run_name(strategy, seed, fold=None):
    return f"{_slug(strategy)}-seed{seed}" + (f"-fold{fold}" if fold is not None else "")


def _run_config(shared, strategy, seed, fold):
    values = {**shared, **expand(strategy), "strategy": strategy, "seed": seed, "run_name": run_name(strategy, seed, fold)}
    if fold is not None:
        values["fold"] = fold
    return config_from_flat(values, FinetuneConfig)


def _run_once(run_config, run_dir, log, verbose, tracking_parent=None):
    """The run's metrics: read when it finished, resumed when interrupted, else run."""

    metrics_path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(metrics_path):
        log("  finished before; skipped")
    else:
        resume = os.path.exists(os.path.join(run_dir, runs.CHECKPOINT_STATE))
        keras.backend.clear_session()
        training.finetune(run_config, resume=resume, overwrite=not resume, verbose=verbose, log=lambda m: log("  " + m),
                 tracking_parent=tracking_parent)
    return atomic.read_json(metrics_path)


def _keep_best_exports(study_dir, rows, strategies, log):
    """Remove the SavedModels of all but each strategy's run best on validation
    (the first of a tie): they are most of a study's disk space, and a study
    compares runs through their metrics, which stay."""
    removed, freed = 0, 0
    for strategy in strategies:
        own = [r for r in rows if r["strategy"] == strategy]
        best = max(own, key=lambda r: r["val_accuracy"])
        for row in own:
            if row is best:
                continue
            # Only the SavedModel version the run's own finetune wrote; anything else under export/
            # (an ONNX export made by hand, a later version) is the user's.
            run_dir = os.path.join(study_dir, row["run"])
            written = atomic.read_json(os.path.join(run_dir, "metrics.json")).get("export_dir")
            if not written:
                continue
            export = os.path.join(run_dir, "export")
            size = owned.remove_export(os.path.join(export, os.path.basename(os.path.normpath(written))))
            if size:
                freed += size
                removed += 1
                with contextlib.suppress(OSError):  # export/ itself goes only when nothing else is in it
                    os.rmdir(export)
    if removed:
        log(f"kept the export of each strategy's best run on validation; removed {removed} others "
            f"({freed / 2**20:.0f} MB; --keep-exports all keeps them)")


def _row(strategy, seed, fold, metrics, run):
    test, val = metrics["test"], metrics["val"]
    row = {
        "strategy": strategy,
        "seed": seed,
        "fold": "" if fold is None else fold,
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro"]["f1"],
        "test_macro_precision": test["macro"]["precision"],
        "test_macro_recall": test["macro"]["recall"],
        "test_loss": test["loss"],
    }
    row.update({f"test_recall_{name}": m["recall"] for name, m in test["per_class"].items()})
    row.update({
        "val_accuracy": val["accuracy"],
        "val_loss": val["loss"],
        "best_epoch": metrics["best_epoch"],
        "epochs": metrics.get("epochs", ""),
        "wall_time_seconds": metrics["wall_time_seconds"],
        "train_images_per_second": metrics["train_images_per_second"],
        "run": run,
    })
    return row


def _write_csv(path, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, text.getvalue())


# --- the report ---------------------------------------------------------------------------------


def _pct(x):
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def write_report(study_dir, rows, commands, strategies, seeds, config, name):
    """`report.md` and the PNGs from the rows of `results.csv` (and each row's
    `tfxfer finetune` command in `commands`); returns the report's path and its
    table and plain-language lines, for the console."""
    by_strategy = {s: sorted((r for r in rows if r["strategy"] == s), key=lambda r: (r["seed"], str(r["fold"]))) for s in strategies}
    folds = config.data.folds
    runs_text = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}" + (f" × {folds} folds" if folds else "")
    summaries = {s: summarize([r[METRIC] for r in rs]) for s, rs in by_strategy.items()}
    f1 = {s: summarize([r["test_macro_f1"] for r in rs]) for s, rs in by_strategy.items()}
    # A study of recipes names neither: its first strategy is the baseline.
    baselines = [b for b in ("scratch", "full") if b in by_strategy] or strategies[:1]
    # Each strategy against scratch and full; full against scratch once, not also the other way.
    comparisons = {
        (s, b): paired([r[METRIC] for r in by_strategy[s]], [r[METRIC] for r in by_strategy[b]])
        for s in strategies for b in baselines if s != b and not (s in baselines and baselines.index(s) < baselines.index(b))
    }
    best = max(strategies, key=lambda s: summaries[s].mean)

    header = ["strategy", "runs", "test accuracy % (mean ± sd)", "95% CI", "macro-F1 %"]
    header += [f"Δ vs {b} (p)" for b in baselines] + ["epochs", "s / run"]
    lines = [
        f"# Study {name}", "",
        f"Data: {config.data.source_name()}" + (f", classes {config.data.classes}" if config.data.classes else "")
        + (f", {config.data.labels_per_class} labels per class" if config.data.labels_per_class else "")
        + f". Backbone {config.model.backbone} at {config.model.image_size or 'its default'} px, weights "
        f"`{config.model.weights}` (scratch: none). Budget per run: "
        + (f"time {config.optim.time_budget}" if config.optim.time_budget else f"{config.optim.epochs} epochs")
        + f", {config.optim.optimizer} lr {config.optim.lr if config.optim.lr == 'auto' else format(config.optim.lr, 'g')} {config.optim.schedule}, batch {config.optim.batch_size}"
        + (", where a strategy sets no recipe option of its own." if any("=" in s for s in strategies) else "."),
        "",
        f"Each strategy ran with {runs_text}; a seed sets the labelled sample, the head's initialization and the "
        "data order, the same for every strategy, so differences are paired. The test split is used once per run, "
        "by the epoch best on validation" + (" (the held-out fold)" if folds else "") + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for s in strategies:
        m = summaries[s]
        cells = [f"**{s}**" if s == best else s, str(m.n), f"{_pct(m.mean)} ± {_pct(m.sd)}",
                 f"{_pct(m.ci_low)} – {_pct(m.ci_high)}", f"{_pct(f1[s].mean)} ± {_pct(f1[s].sd)}"]
        for b in baselines:
            c = comparisons.get((s, b))
            cells.append("–" if c is None else f"{100 * c.mean_difference:+.1f} (p {c.p_value:.2g})" if np.isfinite(c.p_value)
                         else f"{100 * c.mean_difference:+.1f}")
        epochs = [r["epochs"] for r in by_strategy[s] if r["epochs"] != ""]
        cells.append(f"{np.mean(epochs):.0f}" if epochs else "–")
        cells.append(f"{np.mean([r['wall_time_seconds'] for r in by_strategy[s]]):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    table_end = len(lines)
    plain = [f"- {describe(s, b, c, runs_text)}" for (s, b), c in comparisons.items()]
    lines += ["", "## In plain words", "", *plain]
    lines += [
        "",
        f"Best mean test accuracy: **{best}**. Differences are in accuracy points (mean ± sd of the paired "
        "differences); the test is a two-sided paired t-test over the runs that share a seed"
        + (" and fold. Folds share training images, so their pairs are not independent and the p-values are "
           "optimistic (Nadeau & Bengio 2003)" if folds else "")
        + f". Significance at p < 0.05, without correction for the {len(comparisons)} comparisons.",
        "",
        "## Plots", "",
        "![test accuracy per strategy](bar_chart.png)", "",
        "![learning curves](learning_curves.png)", "",
        f"![confusion matrix of {best}](confusion_matrix.png)", "",
        f"![top losses of {best}](top_losses.png)", "",
        "## Reproduce", "",
        "Every run is a plain `tfxfer finetune` command, listed in `commands.txt`; the first of each strategy:", "",
        "```bash",
    ]
    for s in strategies:
        index = next(i for i, r in enumerate(rows) if r["strategy"] == s)
        lines.append(commands[index])
    lines += ["```", ""]
    path = os.path.join(study_dir, "report.md")
    atomic.write_text(path, "\n".join(lines))
    _plot_study(study_dir, by_strategy, summaries, best)
    return path, lines[table_end - len(strategies) - 2:table_end] + [""] + plain


def _plot_study(study_dir, by_strategy, summaries, best):
    strategies = list(by_strategy)
    m = [summaries[s] for s in strategies]
    plots.bar_chart(
        strategies, [x.mean for x in m], [x.ci_low for x in m], [x.ci_high for x in m],
        os.path.join(study_dir, "bar_chart.png"), "test accuracy",
        "test accuracy per strategy: mean and 95% CI" if m[0].n > 1 else "test accuracy per strategy",
    )
    histories = {s: [runs.read_history(os.path.join(study_dir, r["run"])) for r in rs] for s, rs in by_strategy.items()}
    plots.learning_curves(histories, os.path.join(study_dir, "learning_curves.png"),
                          "mean over seeds (band: min to max); solid train, dashed validation")
    best_rows = by_strategy[best]
    first = atomic.read_json(os.path.join(study_dir, best_rows[0]["run"], "metrics.json"))
    class_names = first["test"]["class_names"]
    matrix = sum(np.array(atomic.read_json(os.path.join(study_dir, r["run"], "metrics.json"))["test"]["confusion_matrix"])
                 for r in best_rows)
    plots.confusion_matrix(matrix, class_names, os.path.join(study_dir, "confusion_matrix.png"),
                           f"{best}: test, summed over {len(best_rows)} runs")
    _plot_top_losses(study_dir, best_rows[0], class_names, best)


def _plot_top_losses(study_dir, row, class_names, strategy):
    """The test images the best strategy's first run gets most wrong."""

    run_dir = os.path.join(study_dir, row["run"])
    saved = np.load(os.path.join(run_dir, PREDICTIONS))
    labels, probabilities = saved["labels"], saved["probabilities"]
    losses = -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, 1.0))
    order = np.argsort(-losses)[:TOP_LOSSES]
    run_config = config_from_flat(_flat_saved(run_dir), FinetuneConfig)
    _, _, test, _, _ = runs.load_data(run_config, log=lambda message: None, augment="none")
    wanted, images, seen = set(order.tolist()), {}, 0
    for batch, batch_labels in test.as_numpy_iterator():
        for j in range(len(batch)):
            if seen + j in wanted:
                if batch_labels[j] != labels[seen + j]:
                    raise RuntimeError(f"test order changed since {run_dir} was evaluated")
                images[seen + j] = batch[j]
        seen += len(batch)
        if len(images) == len(wanted):
            break
    predicted = probabilities.argmax(axis=1)
    plots.top_losses(
        [images[i] for i in order], labels[order], predicted[order], probabilities[order, predicted[order]],
        losses[order], class_names, os.path.join(study_dir, "top_losses.png"),
        f"{strategy} ({row['run'].split(os.sep)[-1]}): the {len(order)} test images with the largest loss",
    )


def _flat_saved(run_dir):
    with open(os.path.join(run_dir, runs.CONFIG_FILE)) as f:
        return {k: v for group in yaml.safe_load(f).values() for k, v in group.items()}
