"""The training loop on a real DeepSpeed engine (CPU, one process, ZeRO-2) with the tiny model.

Batches come from the real collate function over samples built here, so these tests do not depend
on a data root; tests/test_train_script.py runs the whole script on generated data. DeepSpeed runs
on the CPU on every host (tests/cpu_deepspeed.py).
"""
import os

import numpy as np
import pytest
import torch
from cpu_deepspeed import cpu_process_group, cpu_subprocess_env

from dataset.collate import collate_fn
from dataset.sample import Sample
from model.conversation import Conversation
from model.lora import apply_lora, enable_gradient_checkpointing, set_trainable
from model.tiny import tiny_model
from model.transforms import ClipTransform, SamTransform
from training.checkpoints import (
    BEST,
    LATEST,
    RunCheckpoints,
    StreamLayout,
    TrainState,
    read_latest_tag,
    write_model_recipe,
)
from training.data_stream import stream_loader
from training.deepspeed_config import DeepSpeedRecipe
from training.engine import build_engine
from training.loop import LoopConfig, LoopIO, loss_on_batch, run_training
from utils import distributed as dist_utils
from utils.logging import NullSink
from utils.sdpa import set_sdpa_backends

ANSWERS = ["Sure, it is [SEG].", "No, there is no dog.", "Yes [SEG]."]


@pytest.fixture(scope="module", autouse=True)
def process_group():
    with cpu_process_group():
        yield


def make_sample(idx: int, model, clip_t, sam_t) -> Sample:
    """A deterministic image + one conversation per idx; the GT box moves with idx."""
    rng = np.random.default_rng(idx)
    h, w = 40 + idx % 7, 56 - idx % 5
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    answer = ANSWERS[idx % len(ANSWERS)]
    masks = torch.zeros((answer.count("[SEG]"), h, w), dtype=torch.uint8)
    if masks.shape[0]:
        y, x = idx % 10, (3 * idx) % 20
        masks[0, y:y + 15, x:x + 20] = 1
    sam = sam_t(img)
    return Sample(source="test", image_path=f"img{idx}.jpg", images_clip=clip_t(img), sam=sam,
                  conversations=[Conversation(["<image>\nWhere is the red square?"], [answer])],
                  masks=masks, exists=[masks.shape[0] > 0], sentences=["red square"])


class IndexedSamples(torch.utils.data.Dataset):
    def __init__(self, model, n):
        self.model, self.n = model, n
        self.clip_t = ClipTransform(model.config.vision.image_size)
        self.sam_t = SamTransform(model.config.sam.image_size)

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        return make_sample(idx, self.model, self.clip_t, self.sam_t)


def trainable_model(tokenizer, token_ids, seed=0, dtype=torch.float32, checkpointing=False):
    model = tiny_model(token_ids, len(tokenizer), seed=seed, dtype=dtype)
    torch.manual_seed(seed)  # LoRA A init
    apply_lora(model)
    set_trainable(model)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model.train()


def engine_for(model, precision="fp32", lr=1e-3, total_steps=100, warmup=2, accum=1, batch=2):
    return build_engine(model, DeepSpeedRecipe(micro_batch_size=batch, grad_accumulation_steps=accum, lr=lr,
                                               total_steps=total_steps, warmup_steps=warmup, precision=precision,
                                               ds_optimizer=False))


def to_engine(engine):
    dtype = next(engine.module.parameters()).dtype
    return lambda b: b.to(engine.device, dtype)


def trainable_state(engine):
    return {n: p.detach().float().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def test_loss_falls_when_overfitting_one_batch_bf16(tokenizer, token_ids):
    model = trainable_model(tokenizer, token_ids, dtype=torch.bfloat16, checkpointing=True)
    engine = engine_for(model, precision="bf16", lr=3e-3, total_steps=40, warmup=1)
    data = IndexedSamples(model, 4)
    batch = to_engine(engine)(collate_fn([data[0], data[2]], tokenizer))
    first = loss_on_batch(engine, batch)
    for _ in range(25):
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
    last = loss_on_batch(engine, batch)
    assert engine.global_steps == 25
    assert np.isfinite(first) and last < 0.5 * first, (first, last)


class Crash(RuntimeError):
    pass


def run_loop(tmp_path, tokenizer, token_ids, *, epochs=2, steps=2, accum=2, crash_at_micro=None, save_steps=1,
             resume=False, validate=None):
    model = trainable_model(tokenizer, token_ids)
    engine = engine_for(model, accum=accum, total_steps=epochs * steps)
    data = IndexedSamples(model, epochs * steps * accum * 2)
    seen = []

    def batches(start, stop):
        loader = stream_loader(data, lambda s: collate_fn(s, tokenizer), start, stop, 0, 1, 2)
        for k, b in zip(range(start, stop), loader):
            if k == crash_at_micro:
                raise Crash(k)
            seen.append((k, b.meta["image_paths"]))
            yield b

    ckpts = RunCheckpoints(str(tmp_path), lambda d: write_model_recipe(d, model.config.to_dict(), tokenizer),
                           StreamLayout(batch_size=2, world_size=1, grad_accumulation_steps=accum))
    state = (ckpts.resume(engine) if resume else None) or TrainState()
    cfg = LoopConfig(epochs=epochs, steps_per_epoch=steps, grad_accumulation_steps=accum, print_freq=1,
                     save_steps=save_steps, no_eval=validate is None)
    io = LoopIO(batches=batches, validate=validate, to_device=to_engine(engine), checkpoints=ckpts, sink=NullSink(),
                progress=False)
    try:
        state = run_training(engine, cfg, io, state)
    except Crash:
        pass
    return engine, state, seen


def test_killed_run_resumes_exactly(tmp_path, tokenizer, token_ids):
    """2 epochs x 2 steps x 2 micro-steps. One run goes straight through; the other is killed in
    step 3 (after the step-2 save), then resumed by a fresh process-like engine. Same data, same
    weights, same optimizer moments at the end."""
    full, full_state, full_seen = run_loop(tmp_path / "full", tokenizer, token_ids)
    _, killed_state, killed_seen = run_loop(tmp_path / "kill", tokenizer, token_ids, crash_at_micro=5)
    assert killed_state.global_step == 2 and read_latest_tag(str(tmp_path / "kill" / LATEST)) == "global_step2"
    resumed, resumed_state, resumed_seen = run_loop(tmp_path / "kill", tokenizer, token_ids, resume=True)
    assert full_state.global_step == resumed_state.global_step == 4 == resumed.global_steps
    assert [k for k, _ in resumed_seen] == [4, 5, 6, 7]  # picks up at the first micro-step after the save
    assert killed_seen[:4] + resumed_seen == full_seen
    a, b = trainable_state(full), trainable_state(resumed)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=0, msg=n)
    ma, mb = full.optimizer.optimizer.state, resumed.optimizer.optimizer.state
    params_a = full.optimizer.optimizer.param_groups[0]["params"]
    params_b = resumed.optimizer.optimizer.param_groups[0]["params"]
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(ma[pa]["exp_avg_sq"], mb[pb]["exp_avg_sq"], rtol=0, atol=0)
    assert full.get_lr() == resumed.get_lr()
    # only the newest tag is kept
    assert sorted(p.name for p in (tmp_path / "kill" / LATEST).glob("global_step*")) == ["global_step4"]


def test_validation_keeps_best_and_latest(tmp_path, tokenizer, token_ids):
    scores = iter([0.5, 0.3, 0.7])

    def validate():
        return {"giou": next(scores), "ciou": 0.1}
    engine, state, _ = run_loop(tmp_path, tokenizer, token_ids, epochs=3, steps=1, accum=1, save_steps=0,
                                validate=validate)
    assert state.best_score == 0.7 and state.best_step == 3
    assert [v["giou"] for v in state.validations] == [0.5, 0.3, 0.7]
    assert read_latest_tag(str(tmp_path / LATEST)) == "global_step3"
    assert read_latest_tag(str(tmp_path / BEST)) == "global_step3"
    for which in (LATEST, BEST):
        assert (tmp_path / which / "sesame_config.json").exists() and (tmp_path / which / "tokenizer").is_dir()


def test_merged_checkpoint_gives_the_engine_outputs(tmp_path):
    """Train from a released-layout start point, save, merge (zero_to_fp32 -> LoRA folded ->
    released layout), load with the checkpoint loader: same losses, masks and answers as the engine."""
    from model.builder import build_for_training, load_pretrained
    from model.tiny import write_tiny_released
    from training.merge import merge_checkpoint

    write_tiny_released(str(tmp_path / "start"), llama_vocab=False)
    loaded = build_for_training(str(tmp_path / "start"), dtype=torch.float32, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(0)
    apply_lora(model)
    set_trainable(model)
    engine = engine_for(model, lr=5e-3, total_steps=6, warmup=1)
    data = IndexedSamples(model, 8)
    for k in range(5):
        batch = to_engine(engine)(collate_fn([data[2 * k % 8], data[(2 * k + 1) % 8]], tok))
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
    lora_b = [p for n, p in engine.module.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.detach().abs().sum()) > 0 for p in lora_b)  # the merge has something to fold in
    ckpts = RunCheckpoints(str(tmp_path / "run"), lambda d: write_model_recipe(d, model.config.to_dict(), tok),
                           StreamLayout(batch_size=2, world_size=1, grad_accumulation_steps=1))
    ckpts.save(engine, TrainState(global_step=5))
    merge_checkpoint(ckpts.path(LATEST), str(tmp_path / "merged"), dtype=torch.float32)
    merged = load_pretrained(str(tmp_path / "merged"), dtype=torch.float32, device="cpu").model

    engine.eval()
    batch = collate_fn([data[1], data[4], data[6]], tok)
    with torch.no_grad():
        a, b = engine(batch), merged(batch)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.ce_loss, a.ce_loss, atol=1e-4, rtol=1e-4)
    for pa, pb in zip(a.pred_masks, b.pred_masks):
        torch.testing.assert_close(pb, pa, atol=1e-3, rtol=1e-3)
    from model.conversation import build_prompt, tokenize_with_image
    prompt = tokenize_with_image(build_prompt("<image>\nWhere is the red square?"), tok)
    args = (batch.images_clip[:1], batch.images_sam[:1], batch.resized_sizes[:1], batch.original_sizes[:1],
            [prompt], [0])
    kw = dict(max_new_tokens=8)
    assert engine.module.predict(*args, **kw)[0].output_ids == merged.predict(*args, **kw)[0].output_ids


def test_train_step_benchmark_smoke():
    """benchmarks/train_step.py --tiny: the GPU benchmark's code path runs and reports every figure."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "train_step.py")
    spec = importlib.util.spec_from_file_location("train_step_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    try:
        with cpu_process_group():  # on any host, as CI runs it
            r = bench.main(["--tiny", "--steps", "2", "--warmup", "1", "--sdpa_backends", "efficient,math",
                            "--length_jitter", "8", "--distinct_batches", "3"])
    finally:
        set_sdpa_backends(())  # a process-wide torch setting: back to torch's default for the other tests
    assert r["sdpa_backends"] == "efficient,math" and len(r["row_lengths"]) >= 2  # lengths change by batch
    assert r["world_size"] == 1 and r["conversations_per_gpu"] == 6 and r["step_s_median"] > 0
    assert r["samples_per_s"] == pytest.approx(2 / r["step_s_median"])
    assert 0 < r["llm_tflops_per_step_per_gpu_frozen_aware"] < r["llm_tflops_per_step_per_gpu_6N"] * 1.5
    # hand count for the tiny LLM: 2 layers, d 64, ffn 128 -> N = 2 * (4*64*64 + 3*64*128) = 81920
    cfg = bench.SesameConfig.tiny(vocab_size=515)
    args = bench.parse_args(["--tiny"])
    args.batch_size = 1
    b = bench.make_batch(cfg, args, seed=0)
    t = 1 + 100 + 14 + cfg.vision.num_patches  # BOS + prompt + answer; the <image> id becomes the patches
    frozen, six_n = bench.llm_flops(cfg, b, cfg.vision.num_patches)
    attention = 3 * (3 * 4 * 2 * t * t * 64)
    assert six_n == 3 * 6 * 81920 * t + attention
    assert frozen == 3 * 4 * 81920 * t + attention + 3 * 2 * 515 * 64 * int((b.labels != -100).sum())


def test_compiled_blocks_train_like_eager_ones(tokenizer, token_ids):
    """--compile: the towers' blocks traced by torch.compile (the eager backend here: the tracing and
    the graphs, without a C++ build) give the eager loss and gradients, with the same parameters."""
    from training.build import compile_blocks

    model = trainable_model(tokenizer, token_ids, checkpointing=False)
    batch = collate_fn([make_sample(i, model, ClipTransform(model.config.vision.image_size),
                                    SamTransform(model.config.sam.image_size)) for i in range(3)], tokenizer)
    keys = list(model.state_dict())

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same LoRA dropout masks
        out = model(batch)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = loss_and_grads()
    n = compile_blocks(model, backend="eager")
    cfg = model.config
    assert n == cfg.llm.num_hidden_layers + cfg.vision.num_hidden_layers + cfg.sam.encoder_depth
    assert list(model.state_dict()) == keys
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, eager_loss)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], msg=lambda m, name=name: f"{name}: {m}")


def test_checkpointing_only_the_first_layers(tokenizer, token_ids):
    """--checkpointed_layers N: the first N decoder layers run their forward again in the backward pass,
    the others do not, and the gradients are those of checkpointing every layer (or none)."""
    model = trainable_model(tokenizer, token_ids, checkpointing=False)
    batch = collate_fn([make_sample(i, model, ClipTransform(model.config.vision.image_size),
                                    SamTransform(model.config.sam.image_size)) for i in range(2)], tokenizer)
    layers = model.language_model.model.layers
    calls = [0] * len(layers)
    # a pre-hook inside the checkpointed function: one on the layer may sit outside it, and the recompute may stop
    # (torch's early stop) before a later module's forward returns
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

    def forwards_and_grads():
        calls[:] = [0] * len(layers)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same LoRA dropout masks
        model(batch).loss.backward()
        return list(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_calls, plain = forwards_and_grads()
    assert plain_calls == [1, 1]
    enable_gradient_checkpointing(model)
    all_calls, every = forwards_and_grads()
    assert all_calls == [2, 2]
    enable_gradient_checkpointing(model, 1)
    first_calls, first = forwards_and_grads()
    assert first_calls == [2, 1]
    for grads in (every, first):
        assert grads.keys() == plain.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, plain[name], msg=lambda m, name=name: f"{name}: {m}")
    with pytest.raises(ValueError, match="between 0 and the LLM's 2"):
        enable_gradient_checkpointing(model, 3)


def test_images_without_seg_keep_the_mask_head_in_the_graph(tokenizer, token_ids):
    """Data-parallel ranks must produce gradients for the same parameters: an image whose answers
    hold no [SEG] still sends a zero-weighted dummy through text_hidden_fcs and the mask decoder."""
    model = trainable_model(tokenizer, token_ids)
    data = IndexedSamples(model, 4)
    no_seg = collate_fn([data[1]], tokenizer)  # "No, there is no dog."
    assert no_seg.masks[0].shape[0] == 0
    out = model(no_seg)
    assert float(out.mask_bce_loss.detach()) == 0.0 and float(out.mask_dice_loss.detach()) == 0.0
    out.loss.backward()
    heads = {n: p for n, p in model.named_parameters() if n.startswith(("text_hidden_fcs", "visual_model.mask_decoder"))
             and "iou_prediction_head" not in n and p.requires_grad}
    assert heads and all(p.grad is not None and float(p.grad.abs().sum()) == 0.0 for p in heads.values())
    with torch.no_grad():  # no dummy work when nothing will be differentiated
        assert model(no_seg).pred_masks[0].shape == (0, *no_seg.original_sizes[0])


RANKS_WORKER = r'''
import os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import torch, torch.distributed as dist
from utils import distributed as dist_utils
dist_utils.init_distributed()
import test_train_engine as T
from dataset.collate import collate_fn
from model.tiny import tiny_tokenizer
from training.deepspeed_config import DeepSpeedRecipe, build_deepspeed_config, client_optimizer
import deepspeed
tok, ids = tiny_tokenizer(os.path.join(sys.argv[1], "assets", "tiny_tokenizer"))
rank = dist_utils.rank()
for stage in (2, 3):
    model = T.trainable_model(tok, ids)
    recipe = DeepSpeedRecipe(micro_batch_size=1, precision="fp32", zero_stage=stage, ds_optimizer=False, lr=1e-2,
                             total_steps=10, warmup_steps=1)
    cfg = build_deepspeed_config(recipe)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny weights
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=client_optimizer(params, recipe),
                                      config=cfg)
    data = T.IndexedSamples(model, 4)
    for step in range(3):  # [SEG] on one rank, none on the other, alternating
        idx = 0 if (rank + step) % 2 == 0 else 1
        batch = T.to_engine(engine)(collate_fn([data[idx]], tok))
        out = engine(batch)
        engine.backward(out.loss)
        engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        check = torch.stack([p.detach().double().sum() for p in engine.module.parameters() if p.requires_grad])
    copies = [torch.zeros_like(check) for _ in range(2)]
    dist.all_gather(copies, check)
    assert torch.equal(copies[0], copies[1]), "ranks diverged"
    print(f"stage {stage} ok", flush=True)
'''


def test_two_ranks_with_and_without_seg_stay_in_step(tmp_path):
    """ZeRO-2 and ZeRO-3 on 2 CPU ranks (torchrun, gloo) where one rank's micro-batch has a [SEG] and
    the other's has none: no collective mismatch, and the replicas stay identical."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    worker = tmp_path / "worker.py"
    worker.write_text(RANKS_WORKER)
    env = cpu_subprocess_env()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(dist_utils.free_port()), str(worker), root],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert run.stdout.count("stage 2 ok") == 2 and run.stdout.count("stage 3 ok") == 2


class Payload:
    """What a tampered checkpoint holds: unpickling it would create the directory `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path, marker):
    """Add a Payload to the dict a checkpoint file holds (read weights-only, written back)."""
    from torch.serialization import safe_globals

    from training.safe_load import deepspeed_pickled_types

    with safe_globals(deepspeed_pickled_types()):
        state = torch.load(path, weights_only=True)
    state["extra"] = Payload(marker)
    torch.save(state, path)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tokenizer, token_ids):
    """A ZeRO-2 checkpoint of one step (model states, optimizer shard, rng file), and its engine."""
    model = trainable_model(tokenizer, token_ids)
    engine = engine_for(model)
    data = IndexedSamples(model, 2)
    out = engine(to_engine(engine)(collate_fn([data[0], data[1]], tokenizer)))
    engine.backward(out.loss)
    engine.step()
    run = tmp_path_factory.mktemp("saved_run")
    ckpts = RunCheckpoints(str(run), lambda d: write_model_recipe(d, model.config.to_dict(), tokenizer),
                           StreamLayout(batch_size=2, world_size=1, grad_accumulation_steps=1))
    ckpts.save(engine, TrainState(global_step=1))
    return engine, ckpts


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "rng_state_rank0.pt"])
@pytest.mark.parametrize("precheck", [True, False], ids=["precheck", "weights_only_alone"])
def test_a_planted_pickle_is_refused_on_resume_and_merge(saved_run, tmp_path, monkeypatch, victim, precheck):
    """Each file of a checkpoint, tampered: resume and merge refuse it with one CheckpointError and
    nothing runs. Without the static pre-check the weights-only load alone still refuses it."""
    import shutil

    import training.checkpoints
    import training.merge
    from model.checkpoint import CheckpointError
    from training.merge import training_state_dict

    engine, ckpts = saved_run
    run = tmp_path / "run"
    shutil.copytree(ckpts.run_dir, run)
    ckpt_dir = run / LATEST
    marker = tmp_path / "payload_ran"
    plant(ckpt_dir / "global_step1" / victim, marker)
    if not precheck:
        monkeypatch.setattr(training.checkpoints, "refuse_unsafe_files", lambda d: None)
        monkeypatch.setattr(training.merge, "refuse_unsafe_files", lambda d: None)
    tampered = RunCheckpoints(str(run), ckpts.write_model_recipe, ckpts.stream)
    with pytest.raises(CheckpointError, match="posix.mkdir") as refused:
        tampered.resume(engine)
    assert "\n" not in str(refused.value) and ("global_step1" in str(refused.value))
    if victim != "rng_state_rank0.pt":  # the merge reads only the DeepSpeed files
        with pytest.raises(CheckpointError, match="posix.mkdir"):
            training_state_dict(str(ckpt_dir))
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the forced mode does not outlive the load
    assert not any(getattr(t, "__name__", "") == "ZeroStageEnum" for t in torch.serialization.get_safe_globals())


def test_resume_needs_the_optimizer_that_wrote_the_checkpoint(saved_run, tmp_path):
    """The checkpoint names the optimizer implementation whose state it holds; resuming with another
    one is refused, in one line naming the flag to use; the same one resumes."""
    import shutil

    from utils.errors import InputError

    engine, ckpts = saved_run
    for written, now, advice in [("torch AdamW", "DeepSpeed FusedAdam", "without --ds_fused_adam"),
                                 ("DeepSpeed FusedAdam", "torch AdamW", "with --ds_fused_adam")]:
        run = tmp_path / written.replace(" ", "_")
        shutil.copytree(ckpts.run_dir, run / "src")
        writer = RunCheckpoints(str(run / "src"), ckpts.write_model_recipe, ckpts.stream, optimizer=written)
        writer.save(engine, TrainState(global_step=1))
        with pytest.raises(InputError, match=advice) as refused:
            RunCheckpoints(str(run / "src"), ckpts.write_model_recipe, ckpts.stream, optimizer=now).resume(engine)
        assert "\n" not in str(refused.value) and written in str(refused.value)
        same = RunCheckpoints(str(run / "src"), ckpts.write_model_recipe, ckpts.stream, optimizer=written)
        assert same.resume(engine).optimizer == written
    # a checkpoint that names no optimizer (written before the record existed) resumes as before
    assert RunCheckpoints(ckpts.run_dir, ckpts.write_model_recipe, ckpts.stream,
                          optimizer="DeepSpeed FusedAdam").resume(engine).optimizer is None


@pytest.mark.parametrize("newer_transformers", [True, False])
def test_gradient_checkpointing_on_old_and_new_transformers(newer_transformers):
    """transformers renamed gradient_checkpointing_enable to activation_checkpointing_enable after 5.17
    (the oldest release requirements.txt allows; the GPU image's): the new name where it exists (the
    old one warns there), the old one otherwise; non-reentrant either way."""
    from types import SimpleNamespace

    calls = []

    class OldLlm:  # transformers 5.17
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("old", gradient_checkpointing_kwargs))

    class NewLlm(OldLlm):
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            calls.append(("new", activation_checkpointing_kwargs))

    enable_gradient_checkpointing(SimpleNamespace(language_model=NewLlm() if newer_transformers else OldLlm()))
    assert calls == [("new" if newer_transformers else "old", {"use_reentrant": False})]
