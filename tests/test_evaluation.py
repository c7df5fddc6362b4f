import numpy as np
from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

from tfxfer.evaluation import classification_report, format_report


def test_report_matches_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    labels[:3] = 3
    probabilities = rng.dirichlet(np.ones(4), 200)
    probabilities[:, 2] *= 0.01  # class 2 is never predicted: precision 0 by convention
    probabilities /= probabilities.sum(1, keepdims=True)
    report = classification_report(labels, probabilities, ["a", "b", "c", "d"])

    predicted = probabilities.argmax(1)
    p, r, f, s = precision_recall_fscore_support(labels, predicted, labels=range(4), zero_division=0)
    assert np.allclose([report["per_class"][n]["precision"] for n in "abcd"], p)
    assert np.allclose([report["per_class"][n]["recall"] for n in "abcd"], r)
    assert np.allclose([report["per_class"][n]["f1"] for n in "abcd"], f)
    assert [report["per_class"][n]["support"] for n in "abcd"] == list(s)
    assert np.isclose(report["macro"]["f1"], f.mean())
    assert report["confusion_matrix"] == confusion_matrix(labels, predicted, labels=range(4)).tolist()
    assert np.isclose(report["loss"], log_loss(labels, probabilities, labels=range(4)))
    assert np.isclose(report["accuracy"], (predicted == labels).mean())
    text = format_report(report)
    assert "macro avg" in text and "confusion matrix" in text


def test_loss_is_not_capped_at_keras_probability_epsilon():
    probabilities = np.array([[1e-9, 1 - 1e-9], [0.5, 0.5]])
    report = classification_report(np.array([0, 0]), probabilities, ["a", "b"])
    assert np.isclose(report["loss"], (-np.log(1e-9) - np.log(0.5)) / 2)


def test_class_names_with_spaces_and_accents_show_in_full(tmp_path):
    import warnings

    from PIL import Image

    from tfxfer.reporting import plots

    names = ["grüne Äpfel", "red apples", "Crème brûlée", "Ωmega"]
    labels = np.array([0, 1, 2, 3, 0, 1])
    probabilities = np.eye(4)[[0, 1, 2, 3, 1, 1]] * 0.9 + 0.025
    report = classification_report(labels, probabilities, names)
    text = format_report(report)
    header = next(line for line in text.splitlines() if "red apples" in line and "Crème brûlée" in line)
    assert all(name in header for name in names)  # the matrix's column heads, untruncated
    assert all(any(line.startswith(name + " ") for line in text.splitlines()) for name in names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plots.confusion_matrix(report["confusion_matrix"], names, str(tmp_path / "cm.png"), "Äpfel: test")
    assert not [w for w in caught if "missing from" in str(w.message)]  # every glyph drawn
    with Image.open(tmp_path / "cm.png") as image:
        assert image.size[0] >= 300
