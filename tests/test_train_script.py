"""train_sesame.py end to end on generated data (CPU on every host, tiny released-layout start
point, real DeepSpeed): a run killed mid-way and auto-resumed matches an uninterrupted one; a 2-rank
run under the deepspeed launcher; its checkpoint merged with merge_lora_weight.sh and re-validated;
bad input stops the script with one `error:` line, before the model is built when it is the data."""
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from child_env import child_pythonpath
from cpu_deepspeed import cpu_process_group, cpu_subprocess_env

import train_sesame
from training.checkpoints import LATEST, read_latest_tag
from training.merge import training_state_dict
from utils import distributed as dist_utils
from utils.errors import InputError, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from dataset.synthetic import generate
    from model.tiny import write_tiny_released

    root = tmp_path_factory.mktemp("train_script")
    generate(str(root / "data"), seed=0)
    write_tiny_released(str(root / "start"), llama_vocab=False)
    with cpu_process_group():
        yield root


@pytest.fixture(scope="module")
def full_run(inputs):
    """An uninterrupted run of 2 epochs x 2 steps (its directory: runs/full)."""
    return train_sesame.main(flags(inputs, "full"))


def flags(root, exp, **over):
    values = {"version": root / "start", "dataset_dir": root / "data", "log_base_dir": root / "runs", "exp_name": exp,
              "epochs": 2, "steps_per_epoch": 2, "batch_size": 2, "grad_accumulation_steps": 2, "precision": "fp32",
              "workers": 0, "val_samples": 6, "val_see_samples": 4, "val_max_new_tokens": 6, "lr": 3e-3,
              "warmup_steps": 1, "print_freq": 1, "save_steps": 1, "logger": "tensorboard", "seed": 0}
    values.update(over)
    return [x for k, v in values.items() for x in (f"--{k}", str(v))] + ["--no_progress"]


def read_log(run_dir):
    """Logged records per (kind, step); each step is logged once, also across a kill and a resume."""
    train, val = {}, {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            kind = val if "val/giou" in rec else train if "train/loss" in rec else None
            if kind is not None:
                assert rec["step"] not in kind, f"step {rec['step']} logged twice"
                kind[rec["step"]] = rec
    return train, val


def subprocess_env():
    return cpu_subprocess_env(PYTHONPATH=child_pythonpath(with_repo=True))


def run_cli(argv) -> tuple[int, list[str]]:
    """train_sesame as its command line runs it: exit status and the `error:` lines on stderr."""
    err = io.StringIO()
    status = run_main(train_sesame.main, [str(a) for a in argv], stderr=err)
    return status, [line for line in err.getvalue().splitlines() if line.startswith("error:")]


def test_killed_run_auto_resumes_like_an_uninterrupted_one(inputs, full_run):
    root = inputs
    full = full_run
    assert full.global_step == 4 and len(full.validations) == 2

    latest = root / "runs" / "killed" / LATEST
    log_path = root / "killed.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_sesame.py"), *flags(root, "killed")],
                                env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while read_latest_tag(str(latest)) is None and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)  # right after the first checkpoint: no chance to clean up
        finally:
            proc.wait()
    saved = read_latest_tag(str(latest))
    assert saved is not None, log_path.read_text()[-3000:]
    killed_at = int(saved.removeprefix("global_step"))
    assert 1 <= killed_at < 4

    resumed = train_sesame.main(flags(root, "killed"))  # --auto_resume is on by default
    assert resumed.global_step == 4
    a = training_state_dict(str(root / "runs" / "full" / LATEST))
    b = training_state_dict(str(root / "runs" / "killed" / LATEST))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    full_train, full_val = read_log(root / "runs" / "full")
    res_train, res_val = read_log(root / "runs" / "killed")
    assert sorted(res_train) == [1, 2, 3, 4]
    for step in range(killed_at + 1, 5):  # same data, weights and optimizer state -> same losses
        for k in ("train/loss", "train/ce_loss", "train/mask_bce_loss", "train/mask_dice_loss", "train/lr"):
            assert res_train[step][k] == pytest.approx(full_train[step][k], rel=1e-5, abs=1e-6), (step, k)
    assert [v["step"] for v in resumed.validations] == [2, 4]
    for a, b in zip(full.validations, resumed.validations):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert resumed.best_score == pytest.approx(full.best_score)
    assert set(full_train[4]) >= {"train/loss", "train/ce_loss", "train/mask_bce_loss", "train/mask_dice_loss",
                                  "train/lr", "train/samples_per_sec", "train/unweighted/mask_bce_loss",
                                  "train/data_wait_fraction"}
    assert all(0.0 <= r["train/data_wait_fraction"] <= 1.0 for r in full_train.values())
    for r in full_train.values():  # the original's scale: weighted parts that add up to the loss
        assert r["train/mask_bce_loss"] == pytest.approx(2.0 * r["train/unweighted/mask_bce_loss"])
        assert r["train/mask_dice_loss"] == pytest.approx(0.5 * r["train/unweighted/mask_dice_loss"])
        assert r["train/mask_loss"] == pytest.approx(r["train/mask_bce_loss"] + r["train/mask_dice_loss"])
        assert r["train/loss"] == pytest.approx(r["train/ce_loss"] + r["train/mask_loss"], rel=1e-5)
    assert {"val/giou", "val/ciou", "val/see"} <= set(full_val[4])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(root / "runs" / "full"))


def test_two_ranks_under_the_deepspeed_launcher_then_merge_and_revalidate(inputs):
    root = inputs
    # the `deepspeed` command runs this module; a host may have the package without the command beside python
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]
    run = subprocess.run([*launcher, "--num_gpus", "2", "--master_port", str(dist_utils.free_port()),
                          os.path.join(ROOT, "train_sesame.py"),
                          *flags(root, "two_ranks", epochs=1, grad_accumulation_steps=1, save_steps=0)],
                         env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "world size 2" in run.stdout
    ckpt = root / "runs" / "two_ranks" / LATEST
    files = set(os.listdir(ckpt / "global_step2"))
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rng_state_rank0.pt", "rng_state_rank1.pt"} <= files
    _, val = read_log(root / "runs" / "two_ranks")

    merged = root / "merged"
    env = dict(subprocess_env(), PYTHON=sys.executable)
    m = subprocess.run(["bash", os.path.join(ROOT, "merge_lora_weight.sh"), str(ckpt), str(merged), "--dtype", "fp32"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert m.returncode == 0, m.stdout[-3000:] + m.stderr[-3000:]
    assert (merged / "config.json").exists() and json.loads((merged / "config.json").read_text())["vocab_size"] > 0

    # The merged model, loaded through the checkpoint loader on one rank, validates on the same
    # seeded draws as the 2-rank run did: the all-reduced metrics must agree.
    again = train_sesame.main(flags(root, "eval_merged", version=merged) + ["--eval_only"])
    metrics = again.validations[-1]
    for k in ("giou", "ciou", "see"):
        assert metrics[k] == pytest.approx(val[2][f"val/{k}"], abs=2e-3), k
    assert metrics["num_masks"] == 6 and metrics["see_queries"] == 4


def test_train_sesame_sh_keeps_the_original_usage(tmp_path):
    stub = tmp_path / "bin"  # a `deepspeed` command on PATH, as pip installs it
    stub.mkdir()
    (stub / "deepspeed").write_text("#!/bin/sh\n")
    (stub / "deepspeed").chmod(0o755)
    env = dict(os.environ, DRY_RUN="1", PATH=f"{stub}{os.pathsep}/usr/bin{os.pathsep}/bin")
    out = subprocess.run(["bash", os.path.join(ROOT, "train_sesame.sh"), "ReferSeg", "localhost:0,1", "15990",
                          "--epochs", "1"], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("deepspeed --include localhost:0\\,1 --master_port=15990 ")
    without = subprocess.run(["bash", os.path.join(ROOT, "train_sesame.sh"), "ReferSeg", "localhost:0,1", "15990"],
                             env=dict(env, PATH=f"/usr/bin{os.pathsep}/bin"), capture_output=True, text=True,
                             check=True).stdout  # the package without its command: the module the command runs
    assert without.startswith("python -m deepspeed.launcher.runner --include localhost:0\\,1 --master_port=15990 ")
    assert "refer_seg\\|\\|correct_refer_seg\\|\\|vqa\\|\\|neg_refer_seg --sample_rates 12\\,2\\,2\\,1" in out
    assert "--batch_size 12 --grad_accumulation_steps 1 --num_classes_per_sample 3" in out
    assert "--dataset_dir ./data " in out and "--zero_stage 2" in out and "--offload_optimizer" not in out
    assert out.strip().endswith("--epochs 1")
    small = subprocess.run(["bash", os.path.join(ROOT, "train_sesame.sh"), "ReferSeg", "localhost:0", "15990"],
                           env=dict(env, BATCH_SIZE="2", GRAD_ACCUMULATION_STEPS="6", OFFLOAD_OPTIMIZER="1"),
                           capture_output=True, text=True, check=True).stdout  # the 24 GB recipe
    assert "--batch_size 2 --grad_accumulation_steps 6" in small and "--offload_optimizer" in small
    out = subprocess.run(["bash", os.path.join(ROOT, "train_sesame.sh"), "ReasonSeg"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "sem_seg\\|\\|refer_seg\\|\\|correct_refer_seg\\|\\|vqa\\|\\|neg_refer_seg\\|\\|reason_seg" in out
    assert "--sample_rates 10\\,10\\,2\\,3\\,1\\,1" in out
    bad = subprocess.run(["bash", os.path.join(ROOT, "train_sesame.sh"), "Nope"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_llava_base_start_with_sasp_bf16_and_the_auto_logger(inputs, tmp_path, monkeypatch):
    """The from-scratch start point (LLaVA-1.5 base + SAM .pth), READ's SasP switched on by flag,
    bf16, `--logger auto`: an offline wandb run where wandb is installed, TensorBoard where not."""
    from model.tiny import write_tiny_llava_base, write_tiny_sam

    root = inputs
    write_tiny_llava_base(str(tmp_path / "llava"))
    write_tiny_sam(str(tmp_path / "sam.pth"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    state = train_sesame.main(flags(root, "from_base", version=tmp_path / "llava",
                                    vision_pretrained=tmp_path / "sam.pth", precision="bf16", epochs=1,
                                    grad_accumulation_steps=1, logger="auto", wandb_project="sesame-test",
                                    num_points=7) + ["--no_eval", "--use_sasp"])
    assert state.global_step == 2
    run_dir = root / "runs" / "from_base"
    recipe = json.loads((run_dir / LATEST / "sesame_config.json").read_text())["sesame_config"]
    assert recipe["sasp"]["num_points"] == 7 and recipe["lora"]["r"] == 8
    assert recipe["llm"]["vocab_size"] == 32003  # the base's 32000 + [SEG], <im_start>, <im_end>
    if importlib.util.find_spec("wandb") is not None:
        assert any(d.startswith("offline-run") for d in os.listdir(run_dir / "wandb"))
    else:
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir))
    train, _ = read_log(run_dir)
    assert sorted(train) == [1, 2] and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in train.values())


def test_use_mm_start_end_reaches_the_tokenizer_config_and_prompts(inputs, tmp_path):
    """--no-use_mm_start_end from a LLaVA base: no <im_start>/<im_end> tokens, the config says so, and
    the collate function (training and teacher-forced validation) builds prompts without them."""
    from model.tiny import write_tiny_llava_base, write_tiny_sam
    from training.args import parse_args
    from training.build import build_model, collate_from_args

    write_tiny_llava_base(str(tmp_path / "llava"))
    write_tiny_sam(str(tmp_path / "sam.pth"))
    args = parse_args(flags(inputs, "mm", version=tmp_path / "llava", vision_pretrained=tmp_path / "sam.pth")
                      + ["--no-use_mm_start_end"])
    loaded = build_model(args, torch.device("cpu"))
    assert loaded.model.config.use_mm_start_end is False
    assert len(loaded.tokenizer) == 32001  # the base's 32000 + [SEG]
    assert collate_from_args(args, loaded).keywords["use_mm_start_end"] is False


def test_bad_flags_are_named(inputs):
    with pytest.raises(SystemExit):
        train_sesame.main(flags(inputs, "bad", precision="fp8"))
    with pytest.raises(InputError, match="nope"):
        train_sesame.main(flags(inputs, "bad", dataset="refer_seg||nope", sample_rates="1,1") + ["--no_eval"])
    with pytest.raises(InputError, match="--epochs"):
        train_sesame.main(flags(inputs, "bad", epochs=0))


def test_missing_validation_set_and_bad_lora_targets_are_named(inputs):
    from dataset.image_io import DatasetFileError

    with pytest.raises(DatasetFileError, match="--val_dataset"):
        train_sesame.main(flags(inputs, "bad", dataset_dir=inputs / "data" / "refer_seg"))
    with pytest.raises(InputError, match="gate_proj"):
        train_sesame.main(flags(inputs, "bad", lora_target_modules="q_proj,gate_proj") + ["--no_eval"])
    with pytest.raises(InputError, match="--checkpointed_layers 9: .* between 0 and the LLM's 2"):
        train_sesame.main(flags(inputs, "bad", checkpointed_layers=9) + ["--no_eval"])


@pytest.fixture
def broken_data(inputs, tmp_path):
    """A copy of the data root to damage."""
    shutil.copytree(inputs / "data", tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.parametrize("fault,flag,expected", [
    ("unknown validation set", {"val_dataset": "refcoco||nope"}, "--val_dataset 'nope'"),
    ("unknown training source", {"dataset": "refer_seg||nope", "sample_rates": "1,1"}, "nope"),
    ("missing data root", {"dataset_dir": "/nonexistent/data"}, "/nonexistent/data"),
    ("invalid JSON", {}, "instances.json (dataset refcoco): not valid JSON"),
    ("truncated refs pickle", {}, "refs(unc_exclude_unified).p"),
])
def test_data_faults_stop_with_one_line_before_the_model_is_built(inputs, broken_data, monkeypatch, fault, flag,
                                                                 expected):
    def no_model(*a, **k):
        raise AssertionError("the model was built before the data was checked")
    monkeypatch.setattr(train_sesame, "build_model", no_model)
    refcoco = broken_data / "refer_seg" / "refcoco"
    if fault == "invalid JSON":
        (refcoco / "instances.json").write_text('{"images": [')
    elif fault == "truncated refs pickle":
        refs = refcoco / "refs(unc_exclude_unified).p"
        refs.write_bytes(refs.read_bytes()[:100])
    status, errors = run_cli(flags(inputs, "faults", **{"dataset_dir": broken_data, **flag}))
    assert status == 1 and len(errors) == 1 and expected in errors[0], errors


def test_resume_with_another_batch_size_is_refused_unless_allowed(inputs, full_run):
    runs = inputs / "runs"
    shutil.copytree(runs / "full", runs / "other_batch")
    status, errors = run_cli(flags(inputs, "other_batch", batch_size=1))
    assert status == 1 and len(errors) == 1 and "--batch_size 2 (now 1)" in errors[0], errors
    assert "--allow_resume_mismatch" in errors[0]
    # allowed: it resumes at step 4 of 4 and so has nothing left to train
    state = train_sesame.main(flags(inputs, "other_batch", batch_size=1) + ["--allow_resume_mismatch"])
    assert state.global_step == 4


class Payload:
    """Unpickling it would create the directory `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_planted_pickle_is_refused_by_auto_resume_resume_dir_and_merge(inputs, full_run, tmp_path):
    """A payload in the model states of a run's checkpoint: auto-resume, --resume DIR and
    merge_lora_weight.sh each stop with one `error:` line, and the payload never runs."""
    from torch.serialization import safe_globals

    from training.safe_load import deepspeed_pickled_types

    runs = inputs / "runs"
    shutil.copytree(runs / "full", runs / "tampered")
    model_states = runs / "tampered" / LATEST / "global_step4" / "mp_rank_00_model_states.pt"
    with safe_globals(deepspeed_pickled_types()):
        state = torch.load(model_states, weights_only=True)
    marker = tmp_path / "payload_ran"
    state["extra"] = Payload(marker)
    torch.save(state, model_states)

    for argv in (flags(inputs, "tampered"), flags(inputs, "elsewhere", resume=runs / "tampered" / LATEST)):
        status, errors = run_cli(argv)
        assert status == 1 and len(errors) == 1 and "mp_rank_00_model_states.pt" in errors[0], errors
        assert "posix.mkdir" in errors[0]
    merge = subprocess.run(["bash", os.path.join(ROOT, "merge_lora_weight.sh"), str(runs / "tampered" / LATEST),
                            str(tmp_path / "merged")], env=dict(subprocess_env(), PYTHON=sys.executable),
                           capture_output=True, text=True, timeout=600)
    errors = [line for line in merge.stderr.splitlines() if line.startswith("error:")]
    assert merge.returncode == 1 and len(errors) == 1 and "posix.mkdir" in errors[0], merge.stderr[-3000:]
    assert "Traceback" not in merge.stderr
    assert not marker.exists()
