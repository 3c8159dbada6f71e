"""benchmarks/eval_ab.py: checkouts timed in alternated processes, each importing its own code, and
every timed run counted. A stand-in benchmark replaces eval_throughput.py (the real one needs a GPU
to mean anything; tests/test_eval_benchmark.py runs it on the CPU)."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAND_IN = '''import json, os, sys
import which  # found through PYTHONPATH: the checkout's own module must come first
with open(os.environ["AB_ORDER"], "a") as f:
    f.write(which.NAME + "\\n")
base = {"a": 100.0, "b": 120.0}[which.NAME]
print(json.dumps({"engine_queries_per_s": base, "rounds": {"as run": [base + 1, base + 2]} if "--repeats" in sys.argv
                  else None, "breakdown_s": {"encoders": base / 100, "decode": 0.5}}))
'''


def _tool():
    spec = importlib.util.spec_from_file_location("eval_ab", os.path.join(ROOT, "benchmarks", "eval_ab.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checkout(path, name: str) -> str:
    os.makedirs(path / "benchmarks")
    (path / "benchmarks" / "eval_throughput.py").write_text(STAND_IN)
    (path / "which.py").write_text(f"NAME = {name!r}\n")
    return str(path)


def test_checkouts_alternate_and_every_run_counts(tmp_path, monkeypatch, capsys):
    ab = _tool()
    a, b = _checkout(tmp_path / "a", "a"), _checkout(tmp_path / "b", "b")
    order = tmp_path / "order.txt"
    monkeypatch.setenv("AB_ORDER", str(order))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([b, ROOT]))  # the caller's path must not leak into a's run
    summary = ab.main(["--tree", f"a={a}", "--tree", f"b={b}", "--rounds", "2", "--log_dir", str(tmp_path / "logs"),
                       "--", "--repeats", "2"])
    assert order.read_text().split() == ["a", "b", "a", "b"]
    assert summary["a"]["queries_per_s"] == [100.0, 101.0, 102.0] * 2 and summary["a"]["median"] == 101.0
    assert summary["b"]["median"] == 121.0 and summary["b"]["stages_s"]["encoders"] == 1.2
    assert sorted(os.listdir(tmp_path / "logs")) == ["a-round0.log", "a-round1.log", "b-round0.log", "b-round1.log"]
    assert "**101.0**" in capsys.readouterr().out


def test_bad_trees_are_named(tmp_path):
    ab = _tool()
    a = _checkout(tmp_path / "a", "a")
    for trees, message in [([f"a={a}"], "at least two"), ([f"a={a}", f"a={a}"], "given twice"),
                           ([f"a={a}", "b"], "NAME=PATH"), ([f"a={a}", f"b={tmp_path}"], "no benchmarks")]:
        with pytest.raises(SystemExit, match=message):
            ab.parse_trees(trees)
