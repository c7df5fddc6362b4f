"""`tfxfer study`: statistics against scipy, strategy expansion, a tiny end-to-end
study on generated data, and a study resumed after a killed run."""

import copy
import csv
import json
import math
import os
import re

import keras
import numpy as np
import pytest
from PIL import Image
from scipy import stats as scipy_stats

import tfxfer
from tfxfer.config import StudyConfig, load_config
from tfxfer.reporting.stats import describe, paired, summarize
from tfxfer.strategies import LP_FT_SCHEDULE, expand, parse_strategies
from tests.conftest import run_cli, write_splits


def test_summary_matches_scipy():
    values = [0.61, 0.64, 0.58, 0.66, 0.62]
    s = summarize(values)
    assert s.n == 5 and s.mean == pytest.approx(np.mean(values)) and s.sd == pytest.approx(np.std(values, ddof=1))
    low, high = scipy_stats.t.interval(0.95, 4, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (s.ci_low, s.ci_high) == (pytest.approx(low), pytest.approx(high))
    one = summarize([0.5])
    assert one.mean == 0.5 and math.isnan(one.sd) and math.isnan(one.ci_low)


def test_paired_test_matches_scipy_and_reads_plainly():
    a, b = [0.70, 0.72, 0.69, 0.74, 0.71], [0.66, 0.70, 0.66, 0.70, 0.69]
    c = paired(a, b)
    assert c.mean_difference == pytest.approx(np.mean(np.subtract(a, b)))
    assert c.p_value == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    line = describe("l2sp@0.01", "full", c, "5 seeds")
    assert line.startswith("l2sp@0.01 beats full by 3.0 ± ") and "p = " in line and "5 seeds" in line
    worse = describe("head", "full", paired(b, a), "5 seeds")
    assert "is worse than full" in worse
    noise = describe("x", "full", paired([0.7, 0.6, 0.65], [0.65, 0.66, 0.64]), "3 seeds")
    assert "no significant difference" in noise
    with pytest.raises(ValueError):
        paired([1, 2], [1, 2, 3])


def test_a_degenerate_paired_test_concludes_nothing_and_stays_quiet(recwarn):
    # Two seeds that differ by the same 4 of 45 test images: no variance, no test.
    same = paired([0.60, 0.70], [0.60 + 4 / 45, 0.70 + 4 / 45])
    assert math.isnan(same.p_value) and not same.significant()
    line = describe("full", "scratch", same, "2 seeds")
    assert "-8.9 points" in line and "too few paired runs" in line and "nothing is concluded" in line
    assert "worse" not in line and "p <" not in line
    flat = paired([0.6, 0.7, 0.8], [0.6 + 4 / 45, 0.7 + 4 / 45, 0.8 + 4 / 45])
    assert math.isnan(flat.p_value) and "never vary" in describe("full", "scratch", flat, "3 seeds")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("scratch", {"weights": "none", "train_bn": "on", "freeze": "full", "l2sp": 0.0, "unfreeze": None}),
        ("head", {"freeze": "head", "train_bn": "off"}),
        ("stages:2+bn", {"freeze": "stages:2", "train_bn": "on"}),
        ("lp-ft", {"freeze": "head", "unfreeze": LP_FT_SCHEDULE}),
        ("l2sp@0.1", {"freeze": "full", "l2sp": 0.1, "unfreeze": None}),
        ("full+bn", {"freeze": "full", "train_bn": "on"}),
        ("full+lr=0.01+schedule=cosine+ema=0.999", {"freeze": "full", "lr": 0.01, "schedule": "cosine", "ema": 0.999}),
        ("lp-ft+bn+lr=auto", {"unfreeze": LP_FT_SCHEDULE, "train_bn": "on", "lr": "auto"}),
    ],
)
def test_strategies_expand_to_plain_options(name, expected):
    options = expand(name)
    assert {k: options[k] for k in expected} == expected
    assert "weights" not in options or name == "scratch"


@pytest.mark.parametrize(
    "text, message",
    [("fulll", "did you mean 'full'"), ("l2sp@x", "positive number"), ("full+xx", r"a suffix is \+bn or \+OPTION=VALUE"), ("full+epochs=3", "OPTION one of lr,"),
     ("full,full", "twice"), ("stages:0", "Unknown strategy")],
)
def test_bad_strategies_fail_in_one_sentence(text, message):
    with pytest.raises(tfxfer.TfxferError, match=message):
        parse_strategies(text)


def test_study_refuses_options_each_run_sets():
    with pytest.raises(tfxfer.TfxferError, match="--l2sp is set by each run of a study"):
        load_config(None, StudyConfig, dataset="digits", l2sp=0.1)


def test_a_study_leaves_the_callers_config_as_it_was(tmp_path, pretrained_backbone):
    pretrained, source = pretrained_backbone  # a class folder: no test split, so the study stops before any run
    config = load_config(None, StudyConfig, data_dir=source, weights=pretrained, output_dir=str(tmp_path / "studies"))
    before = copy.deepcopy(config)
    with pytest.raises(tfxfer.TfxferError, match="has none"):
        tfxfer.study(config, log=lambda *_: None)
    # The study read the backbone and image size of --weights into its own copy.
    assert config == before and (config.model.backbone, config.model.image_size) == ("resnet50", None)


@pytest.fixture
def folder(tmp_path):
    return write_splits(tmp_path / "data", train=10, test=4)


def _study(tmp_path, folder, *extra):
    args = ["study", "--data-dir", folder, "--backbone", "simplecnn", "--weights", "none", "--image-size", "32",
            "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--output-dir", str(tmp_path / "studies"),
            "--name", "s", *extra]
    return run_cli(*args)


class _KillIn(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt


# Four runs and the study's report: 50 s on 2 cores, a sixth of the inner loop. The study's parts
# (strategies, pairing, statistics, leftovers) are tested on their own above and below.
@pytest.mark.slow
def test_a_finished_study_reports_pairs_and_keeps_one_export_per_strategy(finished_study):
    study_dir, output = finished_study
    with open(study_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["strategy"], r["seed"]) for r in rows) == [("full", "0"), ("full", "1"), ("scratch", "0"),
                                                                ("scratch", "1")]
    for row in rows:  # each row is its run's own test accuracy, read back from the run
        metrics = json.loads((study_dir / row["run"] / "metrics.json").read_text())
        assert float(row["test_accuracy"]) == pytest.approx(metrics["test"]["accuracy"])
    report = (study_dir / "report.md").read_text()
    assert re.search(r"\| (\*\*)?full(\*\*)? \| 2 \|", report) and re.search(r"\| (\*\*)?scratch(\*\*)? \| 2 \|", report)
    assert "full vs scratch" in report
    assert (study_dir / "commands.txt").read_text().count("tfxfer finetune") == 4
    for strategy in ("scratch", "full"):
        own = [r for r in rows if r["strategy"] == strategy]
        kept = [r["run"] for r in own if os.path.isdir(study_dir / r["run"] / "export" / "1")]
        assert kept == [max(own, key=lambda r: float(r["val_accuracy"]))["run"]]
    assert "removed 2 others" in output
    with Image.open(study_dir / "bar_chart.png") as image:
        assert image.format == "PNG" and np.asarray(image.convert("L")).std() > 5


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resume_after_a_killed_run(tmp_path, folder, monkeypatch):
    import tfxfer.training

    original = tfxfer.training.finetune

    def killed_in_third_run(config, **kwargs):
        extra = [_KillIn()] if config.run.run_name == "lp-ft-seed0-fold0" and not kwargs.get("resume") else []
        return original(config, callbacks=extra, **kwargs)

    options = ("--strategies", "scratch,full,lp-ft", "--seeds", "0,1", "--folds", "2")
    monkeypatch.setattr(tfxfer.training, "finetune", killed_in_third_run)
    killed = _study(tmp_path, folder, *options)
    assert killed.exit_code == 130 and "run the same command again" in killed.output
    study_dir = tmp_path / "studies" / "s"
    finished = {p: os.path.getmtime(study_dir / "runs" / p / "metrics.json")
                for p in ("scratch-seed0-fold0", "scratch-seed1-fold1", "full-seed1-fold1")}
    # What a user made by hand in every finished run's export/ survives the study's clean-up.
    by_hand = [study_dir / "runs" / p / "export" / "onnx" / "model.onnx" for p in finished]
    for path in by_hand:
        path.parent.mkdir()
        path.write_bytes(b"made by hand")

    result = _study(tmp_path, folder, *options)
    assert result.exit_code == 0, result.output
    assert result.output.count("finished before; skipped") == 8  # 2 strategies x 2 seeds x 2 folds
    assert "resuming lp-ft-seed0-fold0 after epoch 1" in result.output
    for path, mtime in finished.items():
        assert os.path.getmtime(study_dir / "runs" / path / "metrics.json") == mtime, f"{path} was redone"

    with open(study_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["strategy"] for r in rows} == {"scratch", "full", "lp-ft"}
    assert {"test_accuracy", "test_macro_f1", "test_recall_owl", "best_epoch", "wall_time_seconds",
            "train_images_per_second"} <= set(rows[0])
    report = (study_dir / "report.md").read_text()
    assert "| lp-ft | 4 |" in report and "Δ vs scratch (p)" in report and "2 seeds × 2 folds" in report
    assert "full vs scratch" in report and "scratch vs full" not in report
    assert "tfxfer finetune" in (study_dir / "commands.txt").read_text()
    # One export per strategy, the run best on validation; every run keeps its metrics.
    for strategy in ("scratch", "full", "lp-ft"):
        own = [r for r in rows if r["strategy"] == strategy]
        kept = [r["run"] for r in own if os.path.isdir(study_dir / r["run"] / "export" / "1")]
        assert kept == [max(own, key=lambda r: float(r["val_accuracy"]))["run"]]
    assert "removed 9 others" in result.output and "--keep-exports all keeps them" in result.output
    assert all(path.read_bytes() == b"made by hand" for path in by_hand)
    for name, min_size in (("bar_chart", (400, 300)), ("learning_curves", (800, 300)),
                           ("confusion_matrix", (300, 300)), ("top_losses", (400, 300))):
        with Image.open(study_dir / f"{name}.png") as image:
            image.load()
            assert image.format == "PNG" and image.size >= min_size, (name, image.size)
            assert np.asarray(image.convert("L")).std() > 5, f"{name}.png is blank"

    changed = _study(tmp_path, folder, *options, "--lr", "0.1")
    assert changed.exit_code == 1 and "was run with other options (lr 0.1 (saved: 0.01))" in changed.output


def test_a_strategy_value_keeps_its_own_commas():
    names = parse_strategies("scratch,full+augment=flip,crop,l2sp@0.01+augment=flip,stages:2")
    assert names == ["scratch", "full+augment=flip,crop", "l2sp@0.01+augment=flip", "stages:2"]
    assert expand(names[1])["augment"] == "flip,crop"
    with pytest.raises(tfxfer.TfxferError, match="did you mean 'full'"):
        parse_strategies("scratch,fulll")  # a typo after a plain strategy is still a strategy name
