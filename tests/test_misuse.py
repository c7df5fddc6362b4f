"""What a person gets wrong, driven through the command line: each case exits
non-zero with one sentence that names what is wrong, and never a traceback."""

import pytest

from tests.conftest import run_cli, write_class_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("misuse")
    write_class_folder(str(root / "images"), per_class=6)
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a folder")
    return root


def _finetune(data, out, *extra):
    return ("finetune", "--data-dir", data / "images", "--backbone", "tiny", "--weights", "none", "--image-size", "32",
            "--epochs", "1", "--batch-size", "8", "--output-dir", out, *extra)


# (arguments after the common ones, what the message must name)
FINETUNE_CASES = [
    (("--lr", "0"), "lr must be > 0"),
    (("--lr", "-0.1"), "lr must be > 0"),
    (("--lr", "nan"), "Config key lr must be a number or auto, got NaN."),
    (("--lr", "fast"), "Config key lr must be a number or auto, got 'fast'."),
    (("--lr-decay", "0"), "lr_decay must be above 0 and at most 1"),
    (("--ema", "1"), "ema must be between 0 and 1"),
    (("--epochs", "0"), "epochs must be > 0"),
    (("--batch-size", "0"), "batch_size must be > 0"),
    (("--weight-decay", "-1"), "weight_decay must be >= 0"),
    (("--warmup-epochs", "-2"), "warmup_epochs must be >= 0"),
    (("--l2sp", "-0.01"), "l2sp must be >= 0"),
    (("--head-l2", "nan"), "Config key head_l2 must be a number, got NaN."),
    (("--dropout", "1.5"), "dropout must be below 1"),
    (("--label-smoothing", "1"), "label_smoothing must be below 1"),
    (("--val-fraction", "1.5"), "val_fraction must be between 0 and 1"),
    (("--labels-per-class", "0"), "labels_per_class must be at least 1"),
    (("--max-train-examples", "0"), "max_train_examples must be at least 1"),
    (("--image-size", "8"), "image_size must be at least 28"),
    (("--bn-momentum", "1"), "bn_momentum must be in [0, 1)"),
    (("--backbone-lr-mult", "0"), "backbone_lr_mult must be > 0"),
    (("--early-stopping", "0"), "early_stopping must be at least 1"),
    (("--folds", "1"), "--folds must be at least 2"),
    (("--folds", "3", "--fold", "3"), "--fold in 0..folds-1"),
    (("--optimizer", "adamm"), "did you mean 'adam'"),
    (("--schedule", "cosin"), "did you mean 'cosine'"),
    (("--monitor", "val_acc"), "val_accuracy"),
    (("--l2sp-scope", "everything"), "l2sp-scope"),
    (("--class-weight", "balance"), "did you mean 'balanced'"),
    (("--precision", "bf16"), "precision"),
    (("--distribute", "mirror"), "did you mean 'mirrored'"),
    (("--freeze", "stage:2"), "freeze policy"),
    (("--freeze", "stages:two"), "freeze policy"),
    (("--unfreeze", "head@0,full@x"), "Unfreeze phase 'full@x' is not POLICY@EPOCH"),
    (("--augment", "flipp"), "did you mean 'flip'"),
    (("--augment", "rotate:-5"), "--augment rotate:-5"),
    (("--augment", "zoom:big"), "--augment zoom:big"),
    (("--strategy", "l2sp@"), "l2sp@"),
    (("--strategy", "full+xyz"), "+bn"),
    (("--strategy", "full", "--freeze", "head"), "conflicts with --strategy"),
    (("--time-budget", "soon"), "Time budget 'soon' is not a duration"),
    (("--time-budget", "-5m"), "is not a duration"),
    (("--feature-cache", "memory", "--distribute", "mirrored"), "--feature-cache"),
    (("--jit-compile", "--deterministic"), "--jit-compile needs --no-deterministic"),
    (("--classes", "cat,unicorn"), "unicorn"),
    (("--run-name", "../escape"), "--run-name '../escape' must be a plain folder name"),
    (("--run-name", "a/b"), "must be a plain folder name"),
    (("--resume", "--run-name", "never-ran"), "holds no run to resume from"),
    (("--config", "missing.yaml"), "Config file 'missing.yaml' does not exist"),
]


@pytest.mark.parametrize("extra, message", FINETUNE_CASES, ids=[" ".join(c[0]) for c in FINETUNE_CASES])
def test_bad_finetune_options_get_one_sentence(data, tmp_path, extra, message):
    result = run_cli(*_finetune(data, tmp_path / "runs", *extra))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert message in result.output, result.output
    assert not (tmp_path / "runs").exists()  # nothing written


OTHER_CASES = [
    (("finetune", "--backbone", "tiny", "--weights", "none", "--epochs", "1"), "Give exactly one of --dataset"),
    (("finetune", "--data-dir", "{data}/empty", "--backbone", "tiny", "--weights", "none"), "empty"),
    (("finetune", "--data-dir", "{data}/images", "--backbone", "resnet5", "--weights", "none"), "did you mean"),
    (("finetune", "--data-dir", "{data}/images", "--backbone", "tiny", "--weights", "{data}/nowhere.h5"), "nowhere.h5"),
    (("finetune", "--data-dir", "{data}/images", "--backbone", "tiny", "--weights", "{data}/empty"), "without backbone.json"),
    (("pretrain", "--data-dir", "{data}/images", "--method", "simclear"), "did you mean 'simclr'"),
    (("pretrain", "--data-dir", "{data}/images", "--temperature", "0"), "temperature must be > 0"),
    (("pretrain", "--data-dir", "{data}/images", "--denoise", "-1"), "denoise must be >= 0"),
    (("study", "--data-dir", "{data}/images", "--strategies", "ful"), "ful"),
    (("study", "--data-dir", "{data}/images", "--seeds", "0,0"), "--seeds must name at least one seed, none twice"),
    (("study", "--data-dir", "{data}/images", "--seeds", "a"), "--seeds must be whole numbers"),
    (("study", "--data-dir", "{data}/images", "--name", "../up"), "--name '../up' must be a plain folder name"),
    (("study", "--data-dir", "{data}/images", "--keep-exports", "best-only"), "keep-exports"),
    (("finetune", "--data-dir", "{data}/file.txt", "--backbone", "tiny", "--weights", "none"), "file.txt"),
    (("pretrain", "--data-dir", "{data}/images", "--projection-dim", "0"), "projection_dim must be at least 1"),
    (("pretrain", "--data-dir", "{data}/images", "--label-smoothing", "1"), "label_smoothing must be in [0, 1)"),
    (("pretrain", "--data-dir", "{data}/images", "--distribute", "multiworker"), "for finetune"),
    (("evaluate", "--model", "{data}/nowhere", "--data-dir", "{data}/images"), "nowhere"),
    (("predict", "--model", "{data}/nowhere", "{data}/images"), "nowhere"),
    (("predict", "--model", "{data}/runs", "{data}/empty"), "No image to predict"),
    (("predict", "{data}/images"), "Give exactly one of --model"),
    (("export", "{data}/nowhere"), "nowhere"),
    (("finetune", "--data-dir", "{data}/images", "--backbone", "tiny", "--weights", "none", "--output-dir", "{data}/runs",
      "--mlflow", "htp://localhost:5000"), "--mlflow htp://localhost:5000: unknown scheme 'htp'"),
]


@pytest.mark.parametrize("argv, message", OTHER_CASES, ids=[" ".join(c[0][:3]) for c in OTHER_CASES])
def test_bad_commands_get_one_sentence(data, argv, message):
    result = run_cli(*[str(a).format(data=data) for a in argv])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert message.format(data=data) in result.output, result.output


def test_a_run_file_as_weights_names_the_run_folder(data, tmp_path, finished_run):
    for name in ("model.keras", "best.weights.h5"):
        result = run_cli("finetune", "--data-dir", data / "images", "--weights", finished_run / name,
                         "--epochs", "1", "--output-dir", tmp_path)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert f"pass the run folder: --weights {finished_run}" in result.output, result.output


def test_a_tiff_is_named_by_its_format(tmp_path, finished_run):
    from PIL import Image

    tiff = tmp_path / "scan.tif"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tiff)
    result = run_cli("predict", "--model", finished_run, tiff)
    assert result.exit_code == 1
    assert f"{tiff} is a TIFF image, which TensorFlow cannot decode; convert it to PNG or JPEG." in result.output


# Values click itself refuses: a usage error (exit 2) that names the option, never a traceback.
USAGE_CASES = [
    (("finetune", "--seed", "abc"), "'--seed'"),
    (("finetune", "--epochs", "2.5"), "'--epochs'"),
    (("finetune", "--train-bn", "maybe"), "'--train-bn'"),
    (("finetune", "--lr"), "'--lr' requires an argument"),
    (("finetune", "--learning-rate", "0.1"), "No such option '--learning-rate'"),
    (("export", "{data}/images", "--precision", "int8"), "'--precision'"),
    (("predict", "--top", "many", "x.png"), "'--top'"),
    (("predict", "--top", "-3", "x.png"), "'--top': -3 is not in the range x>=1"),
    (("study", "--data-dir", "{data}/images", "--seed", "3"), "'--seeds'?"),
    (("evaluate", "--model", "{data}/images", "--output", "{data}/file.txt"), "'--output'"),
]


@pytest.mark.parametrize("argv, message", USAGE_CASES, ids=[" ".join(c[0][:3]) for c in USAGE_CASES])
def test_values_of_the_wrong_kind_are_usage_errors(data, argv, message):
    result = run_cli(*[str(a).format(data=data) for a in argv])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and message in result.output, result.output


def test_export_never_replaces_a_folder_it_did_not_write(run_copy, tmp_path, monkeypatch):
    import os

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "important.txt").write_text("keep me")
    (mine / "w.bin").write_bytes(b"another model")
    result = run_cli("export", run_copy, "--format", "onnx", "--output", mine)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "holds important.txt, w.bin" in result.output and "new or empty folder" in result.output
    monkeypatch.chdir(mine)
    here = run_cli("export", run_copy, "--output", ".")
    assert here.exit_code == 1 and "Traceback" not in here.output and "important.txt" in here.output, here.output
    assert sorted(os.listdir(mine)) == ["important.txt", "w.bin"] and (mine / "important.txt").read_text() == "keep me"

    # A new folder is made; an earlier export of the same format is replaced whole; another format's is not.
    again = tmp_path / "served"
    assert run_cli("export", run_copy, "--output", again).exit_code == 0
    (again / "variables" / "stale").write_text("from the earlier export")
    assert run_cli("export", run_copy, "--output", again).exit_code == 0
    assert (again / "saved_model.pb").exists() and not (again / "variables" / "stale").exists()
    other = run_cli("export", run_copy, "--format", "onnx", "--output", again)
    assert other.exit_code == 1 and (again / "saved_model.pb").exists(), other.output


def test_export_refuses_a_run_that_another_command_holds(run_copy):
    from tfxfer.runs import RunFolderLock

    training = RunFolderLock(str(run_copy))  # what finetune --resume holds while it trains
    assert training.try_acquire(create=True)
    training.stamp()
    try:
        result = run_cli("export", run_copy, "--format", "saved_model")
    finally:
        training.release()
    assert result.exit_code == 1 and "is in use by PID" in result.output and "once that command has finished" in result.output
    assert sorted(p.name for p in (run_copy / "export").iterdir()) == ["1"]  # nothing exported from the old model
    assert run_cli("export", run_copy, "--format", "saved_model").exit_code == 0  # once it is free


def test_the_file_check_progress_is_one_plain_line_in_a_log(tmp_path, monkeypatch, capsys):
    from tfxfer.data import folders

    write_class_folder(str(tmp_path), classes=("a", "b"), per_class=3)
    paths = [str(p).encode() for p in sorted(tmp_path.rglob("*.*"))]
    monkeypatch.setattr(folders, "PROGRESS_FILES", 1)  # the bar shows on larger scans only
    assert folders.decodable(paths) == set(paths)
    printed = capsys.readouterr().out  # captured: not a terminal, as a log file is not
    assert "\x1b[" not in printed and "\r" not in printed and "\b" not in printed, repr(printed)
    assert "checking 6 image files" in printed and "6/6" in printed, printed


def test_finetune_refuses_a_csv_that_lists_a_test_image_as_a_training_row(tmp_path):
    import json
    import os

    write_class_folder(str(tmp_path / "images"), classes=("cat", "dog"), per_class=6)
    rows = ["path,label,split"]
    for name in ("cat", "dog"):
        files = sorted(os.listdir(tmp_path / "images" / name))
        rows += [f"images/{name}/{f},{name},train" for f in files[:3]] + [f"images/{name}/{files[3]},{name},val"]
        rows += [f"images/{name}/{f},{name},test" for f in files[4:]]
    rows.append("images/cat/004.png,cat,train")  # a test image listed again for training
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    args = ("finetune", "--csv", tmp_path / "data.csv", "--backbone", "tiny", "--weights", "none", "--image-size", "32",
            "--epochs", "1", "--batch-size", "8", "--output-dir", tmp_path / "runs", "--run-name", "r")

    refused = run_cli(*args)
    assert refused.exit_code == 1 and "Traceback" not in refused.output, refused.output
    assert ("1 test image is also in the training split (first: cat/004.png, listed in train and test), so the test "
            "accuracy would count images the model trained on; remove it from one split, or pass --allow-leaks "
            "(allow_leaks: true in the config's data section) to go on anyway.") in refused.output
    assert not (tmp_path / "runs" / "r").exists()

    allowed = run_cli(*args, "--allow-leaks")
    assert allowed.exit_code == 0, allowed.output
    assert ("  leak (allowed by --allow-leaks): 1 test image also in train (first: cat/004.png, listed in train and "
            "test); the test accuracy counts them") in allowed.output
    preflight = json.loads((tmp_path / "runs" / "r" / "metrics.json").read_text())["preflight"]
    assert preflight["leaks"] == {"count": 1, "examples": ["cat/004.png, listed in train and test"]}
    assert preflight["allow_leaks"] is True and preflight["images"] == {"train": 7, "val": 2, "test": 4}
    card = (tmp_path / "runs" / "r" / "export" / "1" / "MODEL_CARD.md").read_text()
    assert "leak (allowed by --allow-leaks): 1 test image also in train (first: cat/004.png" in card


def test_an_unknown_export_version_lists_those_that_exist(finished_run, shared_data):
    image = sorted((shared_data / "test" / "cat").iterdir())[0]
    for argv in (("predict", "--model", finished_run, "--version", "7", image),
                 ("evaluate", "--model", finished_run, "--version", "7", "--data-dir", shared_data)):
        result = run_cli(*argv)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"{finished_run} has no export version 7; its only version is 1." in result.output
    one = run_cli("predict", "--model", finished_run / "export" / "1", "--version", "1", image)
    assert one.exit_code == 1 and "is a single SavedModel version; drop --version" in one.output, one.output


def test_export_output_named_like_a_file_is_refused_and_the_file_kept(run_copy, tmp_path):
    mine = tmp_path / "mymodel.tflite"
    mine.write_bytes(b"the user's own model")
    result = run_cli("export", run_copy, "--format", "litert", "--output", mine)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert (f"--output {mine} names a file, but --output takes a folder: pass --output {tmp_path / 'mymodel'}, and the "
            "litert export writes model.tflite inside it.") in result.output
    assert mine.read_bytes() == b"the user's own model"
    onnx = run_cli("export", run_copy, "--format", "onnx", "--output", tmp_path / "new.onnx")
    assert onnx.exit_code == 1 and "the onnx export writes model.onnx inside it." in onnx.output, onnx.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mymodel.tflite", "runs"]


def test_a_failed_write_advises_only_options_the_command_has(run_copy, finished_run, shared_data, tmp_path, monkeypatch):
    from tests.conftest import read_only

    fix = "; free space or pass --output with a writable folder, then run again."
    with read_only(str(run_copy), monkeypatch):
        exported = run_cli("export", run_copy)
    assert exported.exit_code == 1 and "Traceback" not in exported.output, exported.output
    assert "Cannot write" in exported.output and fix in exported.output
    assert "--output-dir" not in exported.output and "--resume" not in exported.output
    in_the_way = tmp_path / "notes.txt"
    in_the_way.write_text("mine")
    image = sorted((shared_data / "test" / "cat").iterdir())[0]
    explained = run_cli("explain", finished_run, image, "--output", in_the_way / "maps")
    assert explained.exit_code == 1 and "Traceback" not in explained.output, explained.output
    assert "Cannot write" in explained.output and fix in explained.output and "--resume" not in explained.output
    assert in_the_way.read_text() == "mine"


def test_a_run_folder_removed_while_training_is_one_sentence(data, tmp_path):
    import shutil

    import keras

    import tfxfer
    from tfxfer.config import load_config

    class RemoveTheFolder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            shutil.rmtree(tmp_path / "runs" / "gone")  # a user's `rm -rf` in another terminal

    config = load_config(data_dir=str(data / "images"), backbone="tiny", weights="none", image_size=32, epochs=2,
                         batch_size=8, output_dir=str(tmp_path / "runs"), run_name="gone")
    with pytest.raises(tfxfer.TfxferError, match="Run folder .*gone was removed while the run was working, and its "
                                                 "checkpoints with it; start the run again."):
        tfxfer.finetune(config, callbacks=[RemoveTheFolder()], verbose=0, log=lambda message: None)
    assert not (tmp_path / "runs" / "gone").exists()


DATA_SOURCE_CASES = [
    ("csv-semicolons", "lacks the column(s) label, path: its header, read as separated by semicolons, names 'file', "
                       "'class'; rename the columns, or name yours with --csv-path-column and --csv-label-column."),
    ("val-and-valid", "has two validation folders, val/ and valid/; merge them into one or rename the other."),
    ("splits-without-train", "holds the split folder(s) Test/, Val/ and no training folder; add train/ (or training/) "
                             "with one sub-folder per class beside them."),
    ("csv-as-tfrecord", "is not a TFRecord file but a CSV file (pass it with --csv); --tfrecord takes TFRecord files "
                        "(plain or GZIP) of tf.train.Example records."),
]


@pytest.mark.parametrize("case, message", DATA_SOURCE_CASES, ids=[c[0] for c in DATA_SOURCE_CASES])
def test_data_sources_as_people_have_them_get_one_sentence(tmp_path, case, message):
    import os

    if case.startswith("csv"):
        write_class_folder(str(tmp_path / "img"), per_class=2, size=8)
        rows = [f"img/{c}/{f};{c}" for c in ("cat", "dog") for f in sorted(os.listdir(tmp_path / "img" / c))]
        (tmp_path / "labels.csv").write_text("file;class\n" + "\n".join(rows) + "\n")
        source = ("--tfrecord" if case == "csv-as-tfrecord" else "--csv", tmp_path / "labels.csv")
    else:
        for name in ("train", "val", "valid") if case == "val-and-valid" else ("Test", "Val"):
            write_class_folder(str(tmp_path / "data" / name), per_class=2, size=8)
        source = ("--data-dir", tmp_path / "data")
    result = run_cli("finetune", *source, "--backbone", "tiny", "--weights", "none", "--epochs", "1",
                     "--output-dir", tmp_path / "runs")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "runs").exists()
