"""LogME against its definition, on features whose ranking is known, and `tfxfer rank`."""

import json
import os

import numpy as np
import pytest

from tests.conftest import run_cli, write_splits
from tfxfer.errors import TfxferError
from tfxfer.ranking import evidence, logme, parse_candidate


def _features(separation, n=120, d=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(0, 1, (classes, d))
    return separation * centres[labels] + rng.normal(0, 1, (n, d)), labels


@pytest.mark.parametrize("n, d", [(120, 16), (20, 40)])  # more images than features, and fewer
def test_logme_is_the_evidence_of_its_definition_at_its_maximum(n, d):
    features, labels = _features(1.0, n=n, d=d)
    score, precisions = logme(features, labels, details=True)
    direct = []
    for k, (alpha, beta) in zip(np.unique(labels), precisions):
        target = (labels == k).astype(float)
        value = evidence(features, target, alpha, beta)
        direct.append(value)
        if n > d:  # a maximum: moving either precision by 5% either way lowers the evidence
            for a, b in ((alpha * 1.05, beta), (alpha / 1.05, beta), (alpha, beta * 1.05), (alpha, beta / 1.05)):
                assert evidence(features, target, a, b) < value
    assert np.isfinite(score) and score == pytest.approx(np.mean(direct), rel=1e-9)


def test_logme_orders_features_by_how_well_they_separate_the_classes():
    scores = [logme(*_features(s)) for s in (0.0, 0.5, 1.0, 3.0)]
    assert scores == sorted(scores) and scores[0] < scores[-1] - 0.1
    noise = np.random.default_rng(1).normal(0, 1, (120, 16))
    assert logme(noise, np.arange(120) % 3) < logme(*_features(1.0))


def test_candidates_name_a_backbone_its_weights_or_a_run():
    assert parse_candidate("resnet9:none").weights == "none"
    assert parse_candidate("resnet50").weights == "imagenet"
    with pytest.raises(TfxferError, match="resnet51"):
        parse_candidate("resnet51")
    # rank has no --weights option: its advice is in candidate syntax.
    with pytest.raises(TfxferError, match="rank simplecnn:none for random weights, simplecnn:FILE"):
        parse_candidate("simplecnn")
    with pytest.raises(TfxferError, match="No run folder 'saved_models/typo'; pass the folder of a pretrain"):
        parse_candidate(os.path.join("saved_models", "typo"))
    weights = os.path.join("~", "weights", "w.weights.h5")  # NAME:FILE, the form the sentences advise
    assert parse_candidate("resnet9:" + weights).weights == os.path.expanduser(weights)


def test_rank_offline_imagenet_weights_advise_candidate_syntax(tmp_path):
    data = write_splits(tmp_path / "data", train=2, test=1, classes=("cat", "dog"))
    result = run_cli("rank", "--data-dir", data, "resnet50")  # the suite is offline: the download fails
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "rank resnet50:FILE with a local weights file, resnet50:none for random weights" in result.output
    assert "--weights" not in result.output


def test_rank_scores_every_candidate(tmp_path, monkeypatch, finished_run):
    data = write_splits(tmp_path / "data", train=8, test=2, classes=("cat", "dog"))
    monkeypatch.setattr("tfxfer.data.folders.PROGRESS_FILES", 0)  # the file check's progress bar shows too
    result = run_cli("rank", "--data-dir", data, "resnet9:none", "simplecnn:none", finished_run, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)  # the JSON alone: log lines go to standard error
    assert {r["candidate"] for r in rows} == {"resnet9:none", "simplecnn:none", str(finished_run)}
    assert all(np.isfinite(r["logme"]) and r["image_size"] == 32 and r["params"] > 0 for r in rows)
    assert [r["logme"] for r in rows] == sorted((r["logme"] for r in rows), reverse=True)

    table = run_cli("rank", "--data-dir", data, "resnet9:none")
    assert table.exit_code == 0 and "LogME" in table.output
    random = next(r["logme"] for r in rows if r["candidate"] == "resnet9:none")
    assert f"resnet9:none  {random:.4f}" in table.output  # random weights are seeded: the same score again
    missing = run_cli("rank", "resnet9:none")
    assert missing.exit_code == 1 and "--dataset NAME, --data-dir DIR, --csv FILE or --tfrecord GLOB" in missing.output
