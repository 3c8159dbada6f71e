"""One line for the errors a person can act on, a traceback for everything else.

Every script runs its `main` through `run_main`:

    if __name__ == "__main__":
        sys.exit(run_main(main))

A *known* error is one whose message already says what is wrong and where (the flag, file, folder
or field), so a traceback would only bury it. `run_main` prints it as `error: <message>` on one
line of stderr and returns 1. Any other exception is a bug or something unforeseen and keeps its
full traceback. With `--debug` among the arguments (scripts declare it with `add_debug_flag`)
known errors show their traceback too.

Known errors, matched on the exception's class and its bases:
- `InputError` (below): raised by project code for input that cannot work (a flag value, a data
  root, a checkpoint that does not fit the run), and by the boundaries that turn a library's or a
  loader's complaint about the person's input into one sentence naming the flag.
- `model.checkpoint.CheckpointError`: a checkpoint that does not fit the model (missing or
  unexpected keys, shapes, config fields, unknown architecture, unsafe pickles).
- `FileNotFoundError` (with `dataset.image_io.DatasetFileError`), `NotADirectoryError`,
  `IsADirectoryError`, `PermissionError`: a path that is missing or unreadable; the project's
  messages, and Python's own, name the path.
- `utils.image_io.ImageLoadError`: an image that cannot be read, named.
- `pickle.UnpicklingError`: a file whose content a safe loader refused (a truncated refs pickle,
  a pickle asking for code); the project's loaders put the path in the message.

Deliberately not known: bare `ValueError`, `KeyError`, `TypeError`, `IndexError`, `RuntimeError`,
`AssertionError` and the like. They come from bugs as often as from input, so they keep their
traceback; code that knows a `ValueError` means bad input converts it to `InputError`.

Classes of packages above `utils` are listed by name (module and class), so this module imports
nothing from them; tests check that every listed name still resolves.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence, TextIO

DEBUG_FLAG = "--debug"
INTERRUPTED_EXIT = 130  # what a shell reports for Ctrl-C


class InputError(Exception):
    """Input that cannot work, said in one sentence naming the flag, file or field to change."""


KNOWN_ERRORS = (
    f"{__name__}.InputError",
    "model.checkpoint.CheckpointError",
    "builtins.FileNotFoundError",
    "builtins.NotADirectoryError",
    "builtins.IsADirectoryError",
    "builtins.PermissionError",
    "utils.image_io.ImageLoadError",
    "_pickle.UnpicklingError",
)


def is_known(error: BaseException) -> bool:
    """Whether `error` (or one of its base classes) is in KNOWN_ERRORS."""
    return any(f"{c.__module__}.{c.__qualname__}" in KNOWN_ERRORS for c in type(error).__mro__)


def one_line(error: BaseException) -> str:
    """The message with its whitespace (line breaks of listed problems included) collapsed."""
    return " ".join(str(error).split()) or type(error).__name__


def add_debug_flag(parser) -> None:
    """`--debug` on an argparse parser: what `run_main` reads to keep tracebacks of known errors."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of every error")


def run_main(main: Callable[[list[str]], object], argv: Optional[Sequence[str]] = None,
             stderr: Optional[TextIO] = None) -> int:
    """Call `main(argv)` (default argv: sys.argv[1:]); returns the exit status for sys.exit.

    What main returns when that is an int (its own status), else 0; 1 with one `error:` line for a
    known error; 130 on Ctrl-C. Unknown errors
    propagate (Python prints the traceback and exits 1); so does SystemExit (argparse's usage errors).
    Under a multi-process launcher the line says which rank failed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    err = stderr or sys.stderr
    try:
        result = main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=err, flush=True)
        return INTERRUPTED_EXIT
    except Exception as e:
        if DEBUG_FLAG in argv or not is_known(e):
            raise
        print(f"error: {_rank_prefix()}{one_line(e)}", file=err, flush=True)
        return 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _rank_prefix() -> str:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"rank {os.environ.get('RANK', '?')}: "
    return ""
