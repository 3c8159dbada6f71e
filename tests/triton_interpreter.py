"""Run a check script through Triton's CPU interpreter (no GPU in CI), in a child process: Triton
reads TRITON_INTERPRET when it is imported. The child sees the project and tests/ (the *_check.py
comparisons) on its path."""
import os
import subprocess
import sys

import pytest
from child_env import child_pythonpath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_interpreter(check: str) -> subprocess.CompletedProcess:
    pytest.importorskip("triton")
    # the host's own PYTHONPATH entries are kept (a GPU host may keep installed packages there)
    path = os.pathsep.join([os.path.join(ROOT, "tests"), child_pythonpath(with_repo=True)])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
