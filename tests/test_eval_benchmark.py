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
    settings = []  # (--no_overlap_sam, predictor given) of each engine run, in order
    predictors = []
    run_engine = bench.run_engine

    def recorded(loaded, images, args, out_dir, timer=None, predictor=None):
        settings.append((args.no_overlap_sam, predictor is not None))
        predictors.append(predictor)
        return run_engine(loaded, images, args, out_dir, timer=timer, predictor=predictor)

    monkeypatch.setattr(bench, "run_engine", recorded)
    figures = bench.main(["--tiny", "--skip_original", "--images", "3", "--repeats", "2",
                          "--compare", "no_overlap_sam"])
    assert figures["queries"] == 9 and figures["engine_queries_per_s"] > 0
    rounds = figures["rounds"]
    assert list(rounds) == ["as run", "--no_overlap_sam on"]
    assert all(len(v) == 2 and min(v) > 0 for v in rounds.values())
    # warm-up, timed run and synchronised run as configured, with one predictor; then the rounds,
    # alternated, each setting's run after a warm-up of its own predictor
    assert settings == [(False, True)] * 3 + [(False, True), (False, True), (True, True), (True, True)] * 2
    assert predictors[0] is predictors[1] is predictors[2]
    assert predictors[3] is predictors[4] and predictors[5] is predictors[6] and predictors[3] is not predictors[5]
    printed = capsys.readouterr().out
    assert "2 more rounds, --no_overlap_sam on" in printed and "median" in printed


def test_fresh_predictor_builds_one_per_run(monkeypatch):
    bench = _benchmark()
    given = []
    run_engine = bench.run_engine

    def recorded(loaded, images, args, out_dir, timer=None, predictor=None):
        given.append(predictor)
        return run_engine(loaded, images, args, out_dir, timer=timer, predictor=predictor)

    monkeypatch.setattr(bench, "run_engine", recorded)
    bench.main(["--tiny", "--skip_original", "--images", "3", "--fresh_predictor"])
    assert given == [None, None, None]


def test_timeline_charges_idle_gaps_to_the_host_stage(tmp_path):
    """Kernels on two streams, one gap inside a decode range and one outside any stage."""
    bench = _benchmark()

    def kernel(ts, dur, stream, name="k"):
        return {"cat": "kernel", "ts": ts, "dur": dur, "name": name, "args": {"stream": stream}}

    events = [
        {"cat": "user_annotation", "name": "whole_run", "ts": -300, "dur": 3000},
        {"cat": "user_annotation", "name": "decode", "ts": 0, "dur": 450},
        kernel(0, 100, 7), kernel(50, 100, 9, "sam"),  # overlap: busy 0..150
        kernel(400, 100, 7),  # idle 150..400 (host in decode)
        kernel(2000, 500, 7, "gemm"),  # idle 500..2000 (no stage)
    ]
    path = tmp_path / "trace.json"
    path.write_text(__import__("json").dumps({"traceEvents": events}))
    t = bench.summarize_timeline(str(path))
    assert t["gpu_window_ms"] == 2.5 and t["busy_ms"] == 0.75
    assert t["stream_busy_ms"] == {"7": 0.7, "9": 0.1}
    assert t["idle_ms_by_host_stage"] == {"no stage": 1.5, "decode": 0.25}
    assert t["gaps_over_1ms"] == 1
    assert t["top_kernels_ms"][0] == ("gemm", 0.5)
    assert (t["before_first_kernel_ms"], t["after_last_kernel_ms"]) == (0.3, 0.2)  # run -300..2700 us
    assert t["host_stage_spans_ms"] == [("decode", 0.3, 0.8)]  # 0.75 ms, to 0.1 ms


def test_engine_flags_reach_the_engine_config():
    """The benchmark's engine flags become test_sesame.py's, and those the EngineConfig's."""
    import argparse

    import test_sesame

    bench = _benchmark()
    args = argparse.Namespace(max_new_tokens=24, slots_per_group=8, num_workers=2, queries_per_batch=None,
                              cuda_graphs=True, compile_sam=False, no_overlap_sam=True, column_block=64)
    config = test_sesame.engine_config(bench.eval_arguments(args, "/tmp/x"))
    assert (config.cuda_graphs, config.column_block, config.overlap_sam, config.queries_per_batch) == (True, 64, False,
                                                                                                       None)
    args.column_block = None
    assert test_sesame.engine_config(bench.eval_arguments(args, "/tmp/x")).column_block == 256  # EngineConfig's
