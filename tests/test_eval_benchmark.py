"""benchmarks/eval_throughput.py --tiny on the CPU: the GPU benchmark's code path runs, and --repeats
with --compare alternates the two settings in one process."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark():
    path = os.path.join(ROOT, "benchmarks", "eval_throughput.py")
    spec = importlib.util.spec_from_file_location("eval_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_throughput_smoke_with_alternated_rounds(capsys, monkeypatch):
    bench = _benchmark()
    settings = []  # --no_overlap_sam of each engine run, in order
    run_engine = bench.run_engine

    def recorded(loaded, images, args, out_dir, timer=None):
        settings.append(args.no_overlap_sam)
        return run_engine(loaded, images, args, out_dir, timer=timer)

    monkeypatch.setattr(bench, "run_engine", recorded)
    figures = bench.main(["--tiny", "--skip_original", "--images", "3", "--repeats", "2",
                          "--compare", "no_overlap_sam"])
    assert figures["queries"] == 9 and figures["engine_queries_per_s"] > 0
    rounds = figures["rounds"]
    assert list(rounds) == ["as run", "--no_overlap_sam on"]
    assert all(len(v) == 2 and min(v) > 0 for v in rounds.values())
    # warm-up, timed run, synchronised run as configured; then the rounds, alternated
    assert settings == [False, False, False, False, True, False, True]
    printed = capsys.readouterr().out
    assert "2 more rounds, --no_overlap_sam on" in printed and "median" in printed
