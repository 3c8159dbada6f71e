"""PYTHONPATH for the scripts the tests start as child processes."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_pythonpath(with_repo: bool) -> str:
    """This process's PYTHONPATH entries (where a host may keep installed packages, e.g. wheels
    unpacked to a folder) with the repository root first (`with_repo`) or left out (to show that a
    script finds its own modules from any working directory)."""
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and os.path.abspath(p) != ROOT]
    return os.pathsep.join(([ROOT] if with_repo else []) + kept)
