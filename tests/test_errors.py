"""utils.errors: known errors as one `error:` line, everything else with its traceback."""
import importlib
import io
import pickle

import pytest

from utils.errors import KNOWN_ERRORS, InputError, add_debug_flag, is_known, one_line, run_main


def failing(error: BaseException):
    def main(argv):
        raise error
    return main


@pytest.mark.parametrize("error", [
    InputError("--val_dataset 'nope': unknown"),
    FileNotFoundError("no model config: /x/config.json does not exist"),
    PermissionError(13, "Permission denied", "/root/x"),
    pickle.UnpicklingError("/d/refs(unc).p: pickle data was truncated"),
])
def test_known_errors_give_one_line_and_status_1(error, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    err = io.StringIO()
    assert run_main(failing(error), [], stderr=err) == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0]
    assert str(error).split()[0] in lines[0]


def test_project_error_classes_are_known_by_name():
    from dataset.eval_report import EvalDataError
    from dataset.image_io import DataError, DatasetFileError
    from dataset.paths import DataRootError
    from evaluation.report import UnfinishedShards
    from model.checkpoint import CheckpointError
    from model.predictor import PromptError
    from utils.image_io import ImageLoadError

    for error in (CheckpointError("x"), DatasetFileError("x"), ImageLoadError("a.jpg", "not an image", "not_an_image"),
                  DataError("x"), EvalDataError("x"), DataRootError("x"), PromptError("x"), UnfinishedShards("x")):
        assert is_known(error), type(error)
    for name in KNOWN_ERRORS:  # a renamed or moved class would silently stop being known
        module, _, qualname = name.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), qualname), BaseException), name


@pytest.mark.parametrize("error", [ValueError("bad"), KeyError("height"), TypeError("x"), RuntimeError("y"),
                                   AssertionError()])
def test_bugs_keep_their_traceback(error):
    assert not is_known(error)
    with pytest.raises(type(error)):
        run_main(failing(error), [], stderr=io.StringIO())


def test_debug_flag_keeps_the_traceback_of_known_errors():
    import argparse

    p = argparse.ArgumentParser()
    add_debug_flag(p)
    assert p.parse_args(["--debug"]).debug
    with pytest.raises(InputError):
        run_main(failing(InputError("x")), ["--debug"], stderr=io.StringIO())


def test_exit_status_interrupt_usage_and_ranks(monkeypatch):
    assert run_main(lambda argv: None, []) == 0 and run_main(lambda argv: "a result", []) == 0
    assert run_main(lambda argv: 3, []) == 3  # a main that returns its own status
    err = io.StringIO()
    assert run_main(failing(KeyboardInterrupt()), [], stderr=err) == 130 and err.getvalue() == "interrupted\n"
    with pytest.raises(SystemExit):  # argparse usage errors keep their own message and status 2
        run_main(failing(SystemExit(2)), [], stderr=io.StringIO())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    err = io.StringIO()
    run_main(failing(InputError("a\n  b")), [], stderr=err)
    assert err.getvalue() == "error: rank 1: a b\n"


def test_one_line_collapses_listed_problems():
    listed = ValueError("x does not fit:\n  missing a\n  unexpected b")
    assert one_line(listed) == "x does not fit: missing a unexpected b"
    assert one_line(KeyError()) == "KeyError"
