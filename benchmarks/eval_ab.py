"""Two (or more) checkouts of this project timed against each other on one machine.

benchmarks/eval_throughput.py runs in each checkout, each run a process of its own, the checkouts
alternated round after round, so that every one sees the machine at nearly the same time. Machines of
one kind differ by several per cent and one process's runs by up to 8 %: compare the medians this
prints, over several rounds, not single runs.

    git archive 3f9bdaa | (mkdir -p tmp/old && tar -x -C tmp/old)      # an older commit, as files
    python3 benchmarks/eval_ab.py --tree old=tmp/old --tree new=. --rounds 3 -- --skip_original --repeats 2

Everything after `--` goes to eval_throughput.py. Each process reports its timed run and its rounds
(the JSON line it prints last); all of them count. Logs go to --log_dir when given.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("encoders", "prefill_prefix", "prefill_suffix", "decode", "masks")


def parse_trees(specs: list[str]) -> dict[str, str]:
    trees = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--tree {spec!r}: expected NAME=PATH")
        if name in trees:
            raise SystemExit(f"--tree {spec!r}: the name {name!r} is given twice")
        if not os.path.isfile(os.path.join(path, "benchmarks", "eval_throughput.py")):
            raise SystemExit(f"--tree {spec!r}: {path} holds no benchmarks/eval_throughput.py")
        trees[name] = os.path.abspath(path)
    if len(trees) < 2:
        raise SystemExit("give at least two --tree NAME=PATH")
    return trees


def child_env(tree: str) -> dict:
    """The environment for a run in `tree`: PYTHONPATH without this checkout, so that the child imports
    the project's packages from its own tree (the benchmark puts its tree first on the path too)."""
    env = dict(os.environ)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
             if p and os.path.abspath(p) not in (ROOT, tree)]
    env["PYTHONPATH"] = os.pathsep.join([tree, *parts])
    return env


def run_one(tree: str, script: str, args: list[str], timeout: float, log: str | None) -> dict:
    """One benchmark process in `tree`; its figures (the last JSON line of its output)."""
    done = subprocess.run([sys.executable, script, *args], cwd=tree, env=child_env(tree), capture_output=True,
                          text=True, timeout=timeout)
    if log:
        with open(log, "w") as f:
            f.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {script} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"{tree}: {script} printed no figures (a JSON line)")
    return json.loads(lines[-1])


def runs_of(figures: dict) -> list[float]:
    """queries/s of every timed run of one process: the main run, then its rounds."""
    rounds = figures.get("rounds") or {}
    return [figures["engine_queries_per_s"], *(q for qs in rounds.values() for q in qs)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH", help="a checkout to time")
    ap.add_argument("--rounds", type=int, default=3, help="processes per checkout, alternated")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per process")
    ap.add_argument("--log_dir", default=None)
    ap.add_argument("--script", default=os.path.join("benchmarks", "eval_throughput.py"),
                    help="the benchmark, relative to each checkout")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then eval_throughput.py's arguments")
    args = ap.parse_args(argv)
    trees = parse_trees(args.tree)
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for k in range(args.rounds):
        for name, tree in trees.items():
            log = os.path.join(args.log_dir, f"{name}-round{k}.log") if args.log_dir else None
            figures = run_one(tree, args.script, bench_args, args.timeout, log)
            results[name].append(figures)
            print(f"round {k} {name}: " + ", ".join(f"{q:.1f}" for q in runs_of(figures)) + " queries/s", flush=True)
    print(f"\n| checkout | queries/s, every timed run (processes alternated, {args.rounds} each) | median "
          f"| synchronised stages, median of processes (s) |")
    print("|---|---|---|---|")
    summary = {}
    for name, runs in results.items():
        qps = [q for figures in runs for q in runs_of(figures)]
        stages = {s: statistics.median(f["breakdown_s"].get(s, 0.0) for f in runs) for s in STAGES}
        summary[name] = {"queries_per_s": qps, "median": statistics.median(qps), "stages_s": stages}
        parts = ", ".join(f"{s} {v:.2f}" for s, v in stages.items())
        print(f"| {name} ({trees[name]}) | {', '.join(f'{q:.1f}' for q in qps)} | **{summary[name]['median']:.1f}** "
              f"| {parts} |")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
