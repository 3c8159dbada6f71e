"""Where data may live: never inside this code package.

The original kept its data under `./dataset`; here `dataset/` is the code package, so pointing
`--dataset_dir` at it would mix data with code (and a stray `refer_seg/` there would be read as
data). Every loader entry point calls `check_data_root` first.
"""
from __future__ import annotations

import os

from utils.errors import InputError

PACKAGE_DIR = os.path.dirname(os.path.realpath(__file__))


class DataRootError(InputError, ValueError):
    """The data root is unusable (it is, or lies inside, the code package)."""


def check_data_root(path: str) -> str:
    """Return `path`, or raise a one-line DataRootError if it is this code package or inside it."""
    real = os.path.realpath(os.path.expanduser(path))
    if real == PACKAGE_DIR or real.startswith(PACKAGE_DIR + os.sep):
        raise DataRootError(f"--dataset_dir {path} is this project's code package ({PACKAGE_DIR}), not a data "
                            f"folder: put the data elsewhere (e.g. ./data) and pass that folder")
    return path
