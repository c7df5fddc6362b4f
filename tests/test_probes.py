"""The kNN and linear probes: each against an independent reference on fixed features, then as whole runs."""

import json

import keras
import numpy as np
import pytest

from tests.conftest import run_cli, serve, split_images
from tfxfer import probes


def _clusters(n, classes, dim=16, seed=0, spread=1.0):
    """Features around one random centre per class, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2
    labels = np.arange(n) % classes
    return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def _dino_vote(bank, bank_labels, queries, classes, k, temperature):
    """DINO's weighted k-NN, one query at a time: the k most cosine-similar bank rows vote exp(sim / T)."""
    unit = lambda v: v / np.linalg.norm(v)
    out = []
    for query in queries:
        similarity = np.array([unit(query) @ unit(row) for row in bank], dtype=np.float64)
        nearest = np.argsort(-similarity, kind="stable")[:k]
        votes = np.zeros(classes)
        for i in nearest:
            votes[bank_labels[i]] += np.exp(similarity[i] / temperature)
        out.append(votes / votes.sum())
    return np.array(out)


@pytest.mark.parametrize("k, temperature", [(20, 0.07), (5, 0.5), (200, 0.07)])
def test_the_knn_head_votes_as_dino_does(k, temperature):
    bank, bank_labels = _clusters(120, 4, spread=2.5)
    queries, _ = _clusters(30, 4, seed=1, spread=2.5)
    head = probes.KnnHead(4, len(bank), k, temperature)
    head.build((None, bank.shape[1]))
    head.set_bank(bank, bank_labels)
    got = keras.ops.convert_to_numpy(head(queries))
    expected = _dino_vote(bank, bank_labels, queries, 4, min(k, len(bank)), temperature)
    # Every class gets a floor of 1e-6 votes against a nearest neighbour's 1, so a class no neighbour chose stays
    # above zero; within that, the same probabilities.
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all() and got.min() > 0


@pytest.mark.parametrize("classes", [2, 5])
def test_the_linear_probe_is_scikit_learns_logistic_regression_with_the_best_c_on_validation(classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, train_labels = _clusters(200, classes, spread=3.0)
    val, val_labels = _clusters(100, classes, seed=1, spread=3.0)
    test, _ = _clusters(50, classes, seed=2, spread=3.0)
    kernel, bias, c, accuracy = probes.fit_linear(train, train_labels, val, val_labels, classes, log=lambda _: None)

    from sklearn.metrics import log_loss

    scores = {}
    for candidate in probes.L2_GRID:
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=candidate, max_iter=2000))
        pipeline.fit(train, train_labels)
        scores[candidate] = (pipeline.score(val, val_labels), -log_loss(val_labels, pipeline.predict_proba(val)), pipeline)
    # The best validation accuracy; a tie goes to the lower validation log-loss.
    chosen = max(scores, key=lambda candidate: scores[candidate][:2])
    assert c == chosen and accuracy == pytest.approx(scores[chosen][0])
    logits = test @ kernel + bias
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    # StandardScaler divides by the standard deviation alone; the probe adds 1e-6 to it.
    np.testing.assert_allclose(softmax / softmax.sum(1, keepdims=True), scores[chosen][2].predict_proba(test), atol=1e-4)


def test_the_bank_keeps_each_class_in_proportion_and_is_seeded():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    keep = probes.bank_sample(labels, 100, seed=3)
    assert len(keep) == 100 and len(set(keep)) == 100
    assert np.bincount(labels[keep]).tolist() == [90, 9, 1]
    assert (keep == probes.bank_sample(labels, 100, seed=3)).all()
    assert not (keep == probes.bank_sample(labels, 100, seed=4)).all()
    assert (probes.bank_sample(labels, 5000, seed=0) == np.arange(1000)).all()
    # Shares that round down still fill the bank, and more classes than room keep one image each of a few.
    assert len(probes.bank_sample(np.repeat([0, 1, 2], [333, 333, 334]), 100, seed=0)) == 100
    few = probes.bank_sample(np.repeat(np.arange(10), 3), 5, seed=0)
    assert len(few) == 5 and len(set(np.repeat(np.arange(10), 3)[few])) == 5


@pytest.mark.parametrize("probe", ["knn", "linear"])
def test_a_probe_run_is_a_whole_run_whose_savedmodel_serves(probe, shared_data, tmp_path):
    result = run_cli("finetune", "--data-dir", shared_data, "--backbone", "resnet9", "--weights", "none",
                     "--image-size", "32", "--batch-size", "8", "--precision", "float32", "--probe", probe,
                     "--output-dir", tmp_path, "--run-name", "p")
    assert result.exit_code == 0, result.output
    assert f"{probe} probe: " in result.output
    run = tmp_path / "p"
    metrics = json.loads((run / "metrics.json").read_text())
    # One colour per class: random convolutional features separate them, and a probe that did not fit would not.
    assert metrics["test"]["accuracy"] >= 0.9 and metrics["epochs"] == 1 and metrics["trainable_params"] >= 0
    for name in ("confusion_matrix.png", "predictions.csv", "test_predictions.npz", "model.keras", "history.csv"):
        assert (run / name).exists(), name
    images, _ = split_images(shared_data, "test", 32)
    model = keras.models.load_model(run / "model.keras")
    np.testing.assert_allclose(serve(run, images), model.predict(images, verbose=0), atol=1e-5)
    if probe == "knn":
        train = metrics["num_examples"]["train"]
        assert model.head.bank_size == train and f"bank of {train} training images x" in result.output
        exported = run_cli("export", str(run), "--format", "onnx")
        assert exported.exit_code == 0, exported.output
        np.testing.assert_allclose(serve(run, images, "onnx"), model.predict(images, verbose=0), atol=1e-5)


def test_the_bank_cap_samples_the_training_images(shared_data, tmp_path):
    result = run_cli("finetune", "--data-dir", shared_data, "--backbone", "tiny", "--weights", "none",
                     "--image-size", "32", "--probe", "knn", "--knn-bank", "9", "--knn-k", "3",
                     "--output-dir", tmp_path, "--run-name", "p")
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "p" / "metrics.json").read_text())["num_examples"]["train"]
    assert f"bank of 9 training images (a class-stratified sample of {train}: --knn-bank)" in result.output


@pytest.mark.parametrize("options, says", [
    (["--lora", "4"], "--probe knn trains no backbone and takes no gradient step; drop --lora."),
    (["--calibrate"], "drop --calibrate."),
    (["--freeze", "full"], "--probe knn keeps the backbone frozen; drop --freeze full."),
    (["--knn-temperature", "0"], "knn_temperature must be > 0, got 0.0."),
])
def test_a_probe_refuses_what_it_cannot_do_in_one_sentence(options, says, shared_data, tmp_path):
    result = run_cli("finetune", "--data-dir", shared_data, "--backbone", "tiny", "--weights", "none", "--probe", "knn",
                     *options, "--output-dir", tmp_path)
    assert result.exit_code != 0 and says in result.output and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())


def test_a_probe_needs_no_learning_rate_or_budget(shared_data, tmp_path):
    result = run_cli("finetune", "--data-dir", shared_data, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
                     "--probe", "linear", "--lr", "auto", "--time-budget", "1m", "--output-dir", tmp_path, "--run-name", "p")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["epochs"] == 1
    assert "New head: one dense softmax layer over the 3 classes, fitted by logistic regression" in (
        tmp_path / "p" / "export" / "1" / "MODEL_CARD.md").read_text()
    refused = run_cli("lr-find", "--data-dir", shared_data, "--backbone", "tiny", "--weights", "none", "--probe", "knn")
    assert refused.exit_code == 1 and "there is nothing for a range test to find; drop --probe." in refused.output


def test_grad_cam_refuses_a_knn_head_in_one_sentence():
    import tfxfer
    from tfxfer.errors import TfxferError
    from tfxfer.explain import grad_cam

    model = tfxfer.build_model("tiny", num_classes=3, weights=None, image_size=32, probe="knn", knn_bank=4)
    with pytest.raises(TfxferError, match="a knn probe votes by its nearest training images instead"):
        grad_cam(model, np.zeros((1, 32, 32, 3), np.uint8))


def test_a_study_checks_every_run_before_the_first(shared_data, tmp_path):
    result = run_cli("study", "--data-dir", shared_data, "--backbone", "tiny", "--weights", "none", "--strategies",
                     "head,knn", "--calibrate", "--output-dir", tmp_path, "--name", "s")
    assert result.exit_code == 1 and "--probe knn trains no backbone" in result.output
    assert not (tmp_path / "s" / "runs").exists() or not any((tmp_path / "s" / "runs").iterdir())


@pytest.mark.slow
def test_a_study_runs_the_probes_beside_a_fine_tuning(shared_data, tmp_path):
    result = run_cli("study", "--data-dir", shared_data, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
                     "--epochs", "1", "--batch-size", "8", "--strategies", "knn+knn_k=5,linear", "--seeds", "0",
                     "--output-dir", tmp_path, "--name", "s")
    assert result.exit_code == 0, result.output
    report = (tmp_path / "s" / "report.md").read_text()
    for strategy in ("knn+knn_k=5", "linear"):
        assert f"{strategy}** | 1 |" in report or f"| {strategy} | 1 |" in report, report
    assert "--probe knn --knn-k 5" in result.output
