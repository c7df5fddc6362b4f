"""`tfxfer.owned.remove`, the one place tfxfer deletes: each kind of deletion
removes what tfxfer wrote and leaves anything else, and each caller goes through it."""

import json
import os

import pytest

from tfxfer import atomic, owned
from tfxfer.runs import remove_leftovers


def _saved_model(folder):
    os.makedirs(os.path.join(folder, "variables"))
    for name in ("saved_model.pb", "fingerprint.pb", os.path.join("variables", "variables.index")):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"x" * 10)
    with open(os.path.join(folder, "tfxfer.json"), "w") as f:
        json.dump({"precision": "float32"}, f)
    return folder


def _user_file(path, text="keep me"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_a_temporary_goes_and_any_other_name_stays(tmp_path):
    temporary = _user_file(str(tmp_path / "tmp-123-model.keras"))
    mine = _user_file(str(tmp_path / "model-final.keras"))
    assert owned.remove(temporary, "temporary") == len("keep me") and not os.path.exists(temporary)
    assert owned.remove(mine, "temporary") is None and open(mine).read() == "keep me"
    assert owned.remove(str(tmp_path / "tmp-9-gone"), "temporary") == 0  # already gone


def test_an_old_epoch_checkpoint_goes_but_only_inside_checkpoint(tmp_path):
    old = _user_file(str(tmp_path / "run" / "checkpoint" / "epoch-1.index"))
    elsewhere = _user_file(str(tmp_path / "run" / "epoch-1.index"))
    notes = _user_file(str(tmp_path / "run" / "checkpoint" / "notes.txt"))
    assert owned.remove(old, "checkpoint") and not os.path.exists(old)
    assert owned.remove(elsewhere, "checkpoint") is None and os.path.exists(elsewhere)
    assert owned.remove(notes, "checkpoint") is None and os.path.exists(notes)


def test_an_export_goes_only_while_it_holds_nothing_but_the_export(tmp_path):
    clean = _saved_model(str(tmp_path / "export" / "1"))
    assert owned.remove(clean, "export") > 0 and not os.path.exists(clean)
    touched = _saved_model(str(tmp_path / "export" / "2"))
    _user_file(os.path.join(touched, "important.txt"))
    assert owned.foreign(touched, "export") == ["important.txt"]
    assert owned.remove(touched, "export") is None and os.path.exists(os.path.join(touched, "saved_model.pb"))
    plain = _user_file(str(tmp_path / "mine" / "w.bin"))
    assert owned.remove(os.path.dirname(plain), "export") is None and os.path.exists(plain)  # no tfxfer.json


def test_run_entries_are_what_tfxfer_writes_and_an_export_made_by_hand_stays(tmp_path):
    run = tmp_path / "run"
    _saved_model(str(run / "export" / "1"))
    for name in ("lr_find.png", "history.csv", ".lock", "tmp-5-metrics.json"):
        _user_file(str(run / name))
    assert all(not owned.foreign(str(run / name), "run entry") for name in ("lr_find.png", "history.csv", ".lock",
                                                                           "tmp-5-metrics.json", "export"))
    assert owned.remove(str(run), "run") is not None and not run.exists()  # a worker's copy: all tfxfer's

    _saved_model(str(run / "export" / "1"))
    by_hand = _user_file(str(run / "export" / "onnx" / "model.onnx"))
    notes = _user_file(str(run / "notes.txt"))
    assert owned.foreign(str(run / "export"), "run entry") == ["export/onnx"]
    assert owned.foreign(str(run), "run") == ["export/onnx", "notes.txt"]
    assert owned.remove(str(run / "export"), "run entry") is None and owned.remove(str(run), "run") is None
    assert os.path.exists(by_hand) and os.path.exists(notes)


def test_atomic_replacing_removes_its_own_temporaries_only(tmp_path):
    target = str(tmp_path / "folder")
    with atomic.replacing(target) as temporary:
        os.makedirs(temporary)
        _user_file(os.path.join(temporary, "a.txt"), "first")
    with atomic.replacing(target) as temporary:  # the old folder is moved aside and deleted as a temporary
        os.makedirs(temporary)
        _user_file(os.path.join(temporary, "a.txt"), "second")
    with pytest.raises(RuntimeError):
        with atomic.replacing(target) as temporary:
            os.makedirs(temporary)
            raise RuntimeError("killed half-way")
    assert sorted(os.listdir(tmp_path)) == ["folder"] and open(os.path.join(target, "a.txt")).read() == "second"


def test_leftovers_of_a_killed_process_go_and_a_users_files_stay(tmp_path):
    _user_file(str(tmp_path / "tmp-77-history.csv"))
    _user_file(str(tmp_path / "export" / "tmp-77-1" / "saved_model.pb"))
    mine = _user_file(str(tmp_path / "export" / "onnx" / "tmp-notes.txt"))  # tmp- but not tmp-<pid>-
    remove_leftovers(str(tmp_path))
    left = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, files in os.walk(tmp_path) for f in files)
    assert left == [os.path.relpath(mine, tmp_path)]


def test_overwrite_refuses_a_run_with_an_export_made_by_hand_and_accepts_lr_find_png(run_copy, shared_data):
    from tests.conftest import run_cli

    (run_copy / "lr_find.png").write_bytes(b"png")  # written by --lr auto: the run's own
    from tfxfer.runs import _foreign_entries

    assert _foreign_entries(str(run_copy)) == []
    by_hand = _user_file(str(run_copy / "export" / "onnx" / "model.onnx"), "made by hand")
    result = run_cli("finetune", "--data-dir", shared_data, "--output-dir", run_copy.parent, "--run-name", run_copy.name,
                     "--overwrite")
    assert result.exit_code == 1 and "--overwrite replaces only a tfxfer run folder" in result.output, result.output
    assert "export/onnx" in result.output and open(by_hand).read() == "made by hand"


def test_a_run_finishing_again_replaces_the_export_its_killed_attempt_wrote(tmp_path, finished_run):
    from tfxfer.training import _remove_unfinished_export

    assert json.loads((finished_run / "export" / "1" / "tfxfer.json").read_text())["origin"] == "finetune"
    export = tmp_path / "export"
    own, by_command = _saved_model(str(export / "1")), _saved_model(str(export / "2"))
    with open(os.path.join(own, "tfxfer.json"), "w") as f:
        json.dump({"precision": "float32", "origin": "finetune"}, f)  # what a finishing run writes
    _remove_unfinished_export(str(export))
    assert sorted(os.listdir(export)) == ["2"] and os.path.exists(os.path.join(by_command, "saved_model.pb"))
