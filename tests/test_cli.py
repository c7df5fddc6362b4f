import csv
import glob
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import tfxfer
from tfxfer.cli import main
from tests.conftest import read_only, run_cli, write_class_folder


@pytest.fixture
def folder(tmp_path):
    for split, n, seed in (("train", 16, 0), ("test", 4, 1)):
        write_class_folder(str(tmp_path / "data" / split), classes=("cat", "dog", "owl"), per_class=n, seed=seed)
    (tmp_path / "data" / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return str(tmp_path / "data")


def _finetune(tmp_path, folder, *extra):
    args = ["finetune", "--data-dir", folder, "--backbone", "tiny", "--weights", "none", "--image-size", "32",
            "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--output-dir", str(tmp_path / "runs"), *extra]
    keras.backend.clear_session(free_memory=False)
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _history(run_dir):
    with open(os.path.join(run_dir, "history.csv")) as f:
        return list(csv.DictReader(f))


def test_finetune_writes_a_complete_run(tmp_path, folder):
    result = _finetune(tmp_path, folder, "--l2sp", "0.01", "--freeze", "stages:2")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "data-tiny-stages2-l2sp"
    assert "trainable and" in result.output and "frozen parameters" in result.output
    assert "test accuracy" in result.output and "skipped 1 unreadable files" in result.output
    for name in ("config.yaml", "history.csv", "best.weights.h5", "model.keras", "metrics.json", "export/1/saved_model.pb",
                 "learning_curves.png", "confusion_matrix.png", "test_predictions.npz"):
        assert (run / name).exists(), name
    from PIL import Image

    for name in ("learning_curves.png", "confusion_matrix.png"):
        with Image.open(run / name) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 250, (name, image.size)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped_files"]["count"] == 1
    assert metrics["export_max_abs_diff"] < 1e-5
    assert np.array(metrics["test"]["confusion_matrix"]).sum() == 12
    assert set(metrics["test"]["per_class"]) == {"cat", "dog", "owl"}
    rows = _history(run)
    assert len(rows) == 2 and "l2sp" in rows[0] and "val_l2sp" not in rows[0]


def test_checkpoint_holds_weights_and_optimizer_state_but_no_anchors(tmp_path, folder):
    assert _finetune(tmp_path, folder, "--l2sp", "1.0", "--run-name", "r").exit_code == 0
    model = keras.models.load_model(str(tmp_path / "runs" / "r" / "model.keras"))
    assert model.compiled and model.penalty.alpha == 1.0  # ready for continued training
    weight_bytes = sum(int(np.prod(w.shape)) * 4 for w in model.weights)
    trainable_bytes = sum(int(np.prod(w.shape)) * 4 for w in model.trainable_weights)
    checkpoint = sum(os.path.getsize(f) for f in glob.glob(str(tmp_path / "runs" / "r" / "checkpoint" / "epoch-*")))
    # weights + SGD momentum (one slot per trainable weight); anchors would add another weight_bytes.
    assert weight_bytes < checkpoint < weight_bytes + trainable_bytes + 0.5 * weight_bytes


@pytest.mark.slow
def test_same_seed_gives_identical_history(tmp_path, folder):
    assert _finetune(tmp_path, folder, "--seed", "3", "--augment", "flip_crop", "--run-name", "a").exit_code == 0
    assert _finetune(tmp_path, folder, "--seed", "3", "--augment", "flip_crop", "--run-name", "b").exit_code == 0
    a, b = _history(tmp_path / "runs" / "a"), _history(tmp_path / "runs" / "b")
    assert a == b and float(a[0]["loss"]) > 0


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path, folder):
    assert _finetune(tmp_path, folder, "--run-name", "x").exit_code == 0
    again = _finetune(tmp_path, folder, "--run-name", "x")
    assert again.exit_code == 1 and "already exists" in again.output and "--resume" in again.output
    assert _finetune(tmp_path, folder, "--run-name", "x", "--overwrite").exit_code == 0


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt


def test_interrupted_run_resumes(tmp_path, folder, monkeypatch):
    import tfxfer.training

    original = tfxfer.training.finetune
    monkeypatch.setattr(tfxfer.training, "finetune", lambda *a, **k: original(*a, callbacks=[_Interrupt()], **k))
    monkeypatch.chdir(tmp_path)  # a relative --output-dir, as typed
    stopped = _finetune(tmp_path, folder, "--run-name", "crash", "--epochs", "3", "--output-dir", "runs")
    assert stopped.exit_code == 130 and "tfxfer finetune --resume --run-name crash" in stopped.output
    monkeypatch.setattr(tfxfer.training, "finetune", original)

    # The folder moves, and the user resumes from another working directory.
    os.rename(tmp_path / "runs", tmp_path / "moved")
    monkeypatch.chdir(folder)
    resumed = _finetune(tmp_path, folder, "--run-name", "crash", "--resume", "--epochs", "3",
                        "--output-dir", str(tmp_path / "moved"))
    assert resumed.exit_code == 0, resumed.output
    assert "resuming crash after epoch 1" in resumed.output
    assert [row["epoch"] for row in _history(tmp_path / "moved" / "crash")] == ["0", "1", "2"]


def test_predict_and_evaluate_use_the_export(run_copy, shared_data):
    run, folder = str(run_copy), str(shared_data)  # evaluate writes its report into the run: a copy
    image = sorted(glob.glob(os.path.join(folder, "test", "owl", "*.png")))[0]
    predicted = CliRunner().invoke(main, ["predict", "--model", run, image])
    assert predicted.exit_code == 0, predicted.output
    lines = predicted.output.strip().splitlines()
    assert lines[0] == f"model: {os.path.join(run, 'export', '1')} (version 1, float32)"
    lines = lines[1:]
    assert lines[0] == image and len(lines) == 4  # three classes
    assert abs(sum(float(line.split()[0]) for line in lines[1:]) - 1) < 1e-3

    evaluated = CliRunner().invoke(main, ["evaluate", "--model", run, "--data-dir", folder])
    assert evaluated.exit_code == 0, evaluated.output
    assert "precision" in evaluated.output and "confusion matrix" in evaluated.output and "macro avg" in evaluated.output
    assert evaluated.output.splitlines()[0] == f"model: {os.path.join(run, 'export', '1')} (version 1, float32)"
    metrics = json.loads(open(os.path.join(run, "metrics.json")).read())
    evaluation = metrics["evaluations"]["data:test"]
    assert evaluation["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert np.array(evaluation["confusion_matrix"]).shape == (3, 3)

    # predictions.csv: every test image by file, agreeing with the report and with predict.
    with open(os.path.join(run, "predictions.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    test_files = sorted(glob.glob(os.path.join(folder, "test", "*", "*")))
    assert sorted(r["file"] for r in rows) == test_files
    assert np.mean([r["true"] == r["predicted"] for r in rows]) == pytest.approx(evaluation["accuracy"])
    # predictions.csv rounds each loss to 6 decimals
    assert np.mean([float(r["loss"]) for r in rows]) == pytest.approx(evaluation["loss"], rel=1e-4, abs=1e-6)
    assert all(r["true"] == os.path.basename(os.path.dirname(r["file"])) for r in rows)
    row = next(r for r in rows if r["file"] == image)
    assert float(row["probability"]) == pytest.approx(float(lines[1].split()[0]), abs=1e-4)
    assert row["predicted"] == lines[1].split()[1]
    wrong = sorted((r for r in rows if r["true"] != r["predicted"]), key=lambda r: -float(r["probability"]))
    # The report names the most confidently wrong image exactly when there is one.
    assert ("most confidently wrong" in evaluated.output) == bool(wrong), evaluated.output
    assert not wrong or wrong[0]["file"] in evaluated.output


def test_a_read_only_model_folder_still_predicts_and_evaluates(tmp_path, run_copy, shared_data, monkeypatch):
    run, folder = str(run_copy), str(shared_data)
    before = {path: os.path.getmtime(path) for path in glob.glob(os.path.join(run, "**"), recursive=True)}
    image = sorted(glob.glob(os.path.join(folder, "test", "owl", "*.png")))[0]
    with read_only(run, monkeypatch):
        predicted = CliRunner().invoke(main, ["predict", "--model", run, image])
        evaluated = CliRunner().invoke(main, ["evaluate", "--model", run, "--data-dir", folder])
        kept = CliRunner().invoke(main, ["evaluate", "--model", run, "--data-dir", folder,
                                         "--output", str(tmp_path / "report")])
    assert predicted.exit_code == 0 and predicted.output.splitlines()[1] == image, predicted.output
    assert evaluated.exit_code == 0 and "confusion matrix" in evaluated.output, evaluated.output
    assert evaluated.output.count("could not write") == 1 and "--output FOLDER" in evaluated.output
    assert "Traceback" not in evaluated.output and "--output-dir" not in evaluated.output
    assert {path: os.path.getmtime(path) for path in before} == before
    assert kept.exit_code == 0 and "could not write" not in kept.output, kept.output
    report = json.load(open(tmp_path / "report" / "metrics.json"))["evaluations"]["data:test"]
    assert report["accuracy"] == pytest.approx(json.load(open(os.path.join(run, "metrics.json")))["test"]["accuracy"])
    assert len(open(tmp_path / "report" / "predictions.csv").read().splitlines()) == 1 + 12


def test_predict_takes_folders_and_globs_and_prints_json(finished_run, shared_data):
    folder = str(shared_data)
    owl = os.path.join(folder, "test", "owl")
    result = CliRunner().invoke(main, ["predict", "--model", str(finished_run), "--top", "2", "--json",
                                       owl, os.path.join(folder, "test", "c*", "*.png")])
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)  # the JSON alone: the line naming the model goes to standard error
    expected = sorted(glob.glob(os.path.join(owl, "*"))) + sorted(glob.glob(os.path.join(folder, "test", "c*", "*.png")))
    assert [a["file"] for a in answers] == expected
    assert all(len(a["top"]) == 2 and a["top"][0]["probability"] >= a["top"][1]["probability"] for a in answers)
    assert {a["top"][0]["class"] for a in answers} <= {"cat", "dog", "owl"}


def test_config_file_and_unknown_keys(tmp_path, folder):
    config = tmp_path / "c.yaml"
    config.write_text(f"data_dir: {folder}\nbackbone: tiny\nweights: none\nimage_size: 32\nepochs: 1\nlearning_rate: 0.1\n")
    result = CliRunner().invoke(main, ["finetune", "--config", str(config)])
    assert result.exit_code == 1 and "Unknown config key 'learning_rate'" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["finetune", "--dataset", "digits", "--backbone", "resnet5"], "did you mean 'resnet50'"),
        (["finetune", "--dataset", "digits", "--optimizer", "adamm"], "did you mean 'adam'"),
        (["finetune", "--dataset", "cifar10", "--tfds-data-dir", "{tmp}/tfds"], "--tfds-data-dir"),  # offline
        (["predict", "x.jpg"], "exactly one of --model"),
        (["evaluate", "--model", "/no/run", "--dataset", "digits"], "No SavedModel"),
    ],
)
def test_user_errors_are_one_sentence(tmp_path, args, message):
    tfds_dir = tmp_path.parent / "tfds-cache"  # outside tmp_path, whose emptiness is checked
    args = [a.replace("{tmp}", str(tfds_dir)) for a in args]
    result = CliRunner().invoke(main, args + (["--output-dir", str(tmp_path)] if args[0] == "finetune" else []))
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert os.listdir(tmp_path) == []  # no half-made run folder blocks the next try


def test_predict_with_the_imagenet_head_offline_says_what_to_do(tmp_path, offline_keras):
    write_class_folder(str(tmp_path), classes=("a",), per_class=1)
    result = CliRunner().invoke(main, ["predict", "--backbone", "resnet50", str(tmp_path / "a" / "000.jpg")])
    assert result.exit_code == 1 and "--model" in result.output and ".keras" in result.output


def test_backbones_lists_sizes_parameters_and_stages():
    result = CliRunner().invoke(main, ["backbones", "resnet50"])
    assert result.exit_code == 0
    assert "resnet50" in result.output and "224" in result.output and "23,587,712" in result.output
    assert "stem conv2 conv3 conv4 conv5" in result.output


def test_backbones_answers_from_the_specs_without_tensorflow():
    import subprocess
    import sys

    script = ("import sys; sys.argv = ['tfxfer', 'backbones']; from tfxfer.cli import main; "
              "main(standalone_mode=False); print('tensorflow loaded:', 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^efficientnetb3 +300 ", result.stdout, re.M) and "58,370,944" in result.stdout
    assert re.search(r"^convnext_tiny .*ImageNet-1k \(keras.applications\) +MIT", result.stdout, re.M)
    assert "tensorflow loaded: False" in result.stdout


def test_python_dash_m_runs_the_command():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tfxfer", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "Usage: tfxfer" in result.stdout and "study" in result.stdout


def _as_the_command(code, env=()):
    """Run `code` in a fresh Python whose argv[0] is the `tfxfer` console script,
    as when a user types `tfxfer ...`; `code` prints what it found."""
    script = os.path.join(os.path.dirname(sys.executable), "tfxfer")
    wrapped = f"import sys\nsys.argv[0] = {script!r}\n{code}"
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **dict(env)}
    return subprocess.run([sys.executable, "-c", wrapped], env=environment, capture_output=True, text=True, timeout=120)


HEAVY = "print('HEAVY', sorted(m for m in ('tensorflow', 'keras', 'tensorflow_datasets', 'matplotlib') if m in sys.modules))"


@pytest.mark.parametrize("argv", [["--help"], ["finetune", "--help"], ["study", "--help"], ["pretrain", "--help"]])
def test_help_does_not_import_tensorflow(argv):
    done = _as_the_command(
        f"from tfxfer.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n{HEAVY}"
    )
    assert done.returncode == 0, done.stderr[-1500:]
    assert "HEAVY []" in done.stdout and "Usage:" in done.stdout


def test_python_dash_m_help_does_not_import_tensorflow():
    # runpy imports the package while sys.argv[0] is "-m", then runs __main__.
    code = ("import runpy, sys\nsys.argv = ['-m', '--help']\ntry:\n    runpy.run_module('tfxfer', run_name='__main__', "
            f"alter_sys=True)\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n{HEAVY}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert "HEAVY []" in done.stdout and "Usage:" in done.stdout


def test_shell_completion_answers_without_tensorflow():
    completing = {"_TFXFER_COMPLETE": "bash_complete", "COMP_WORDS": "tfxfer finetune --backb", "COMP_CWORD": "2"}
    done = _as_the_command(f"from tfxfer.cli import main\ntry:\n    main(prog_name='tfxfer')\nexcept SystemExit:\n    pass\n{HEAVY}", completing)
    assert "--backbone" in done.stdout and "HEAVY []" in done.stdout, done.stdout + done.stderr[-1500:]


def test_import_tfxfer_registers_transfer_model_for_keras_load_model(tmp_path):
    path = str(tmp_path / "m.keras")
    tfxfer.build_model("simplecnn", num_classes=2, weights=None, image_size=32).save(path)
    # A fresh Python that only imports tfxfer, as a user's script would.
    code = f"import tfxfer, keras\nprint(type(keras.models.load_model({path!r})).__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("TransferModel"), done.stderr[-1500:]


def test_exit_codes_usage_2_user_error_1(tmp_path):
    assert run_cli("finetune", "--no-such-flag").exit_code == 2
    assert run_cli("finetune", "--epochs", "many").exit_code == 2
    mistake = run_cli("finetune", "--dataset", "cifar1O", "--tfds-data-dir", tmp_path)
    assert mistake.exit_code == 1 and "did you mean" in mistake.output


def test_python_dash_m_tfxfer_works():
    done = subprocess.run([sys.executable, "-m", "tfxfer", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "version" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["export", "somewhere", "--format", "onx"], "Unknown export format 'onx'; did you mean 'onnx'?"),
    (["rank", "simplecnn"], "Give the target data"),
])
def test_mistakes_that_need_no_tensorflow_are_named_before_it_loads(argv, message):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "tfxfer", *argv], capture_output=True, text=True,
                            timeout=120)
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert result.returncode == 1 and "click" in imported and "tensorflow" not in imported, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_the_command_knows_every_export_format_the_registry_has():
    from tfxfer.config import EXPORT_FORMATS
    from tfxfer.export import FORMATS

    assert set(FORMATS) == set(EXPORT_FORMATS)


def test_every_public_name_is_what_its_module_defines_once_all_modules_loaded():
    import importlib

    for name, module in tfxfer._PUBLIC.items():
        importlib.import_module(module)  # a submodule of the same name would shadow the function
        assert getattr(tfxfer, name) is getattr(importlib.import_module(module), name), name
