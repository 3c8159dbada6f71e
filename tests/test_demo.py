"""demo.py end to end on the tiny random model: one-shot (in process and as a script, --json),
the interactive loop with scripted input, and the real script driven through a pseudo-terminal."""
import io
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pexpect
import pytest
import torch
from child_env import child_pythonpath
from PIL import Image

import demo
from app.query import QuerySettings, run_query
from engine.build import build_predictor
from model.builder import load_pretrained
from model.predictor import PromptError, say_text
from utils.errors import InputError
from utils.image_io import load_image
from utils.text import printable
from utils.visualize import overlay_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(ROOT, "assets", "shapes.jpg")
FEW_TOKENS = "6"
SCRIPT_TIMEOUT_S = 240  # model load + a few tokens; generous for a loaded 2-core machine


@pytest.fixture(scope="module")
def loaded():
    return load_pretrained("tiny-random", device="cpu", dtype=torch.float32)


def _predictor(loaded, hook=None, max_new_tokens=int(FEW_TOKENS), conv_type="vicuna_v1"):
    """The demo's predictor; `hook(step, logits)` forces tokens of the one query."""
    row_hook = None if hook is None else (lambda step, logits, rows: hook(step, logits))
    return build_predictor(loaded, conv_type=conv_type, max_new_tokens=max_new_tokens, logits_hook=row_hook)


def _load(argv):
    from engine.build import load_predictor

    return load_predictor(demo.parse_args(argv))


def _settings(tmp_path, **kw):
    return QuerySettings(vis_save_dir=str(tmp_path / "vis"), **kw)


def _script_env():
    # one thread: on a shared, loaded CPU, OpenMP's spinning threads make tiny models ~10x slower
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               LANG="C.UTF-8", LC_ALL="C.UTF-8")
    env["PYTHONPATH"] = child_pythonpath(with_repo=False)
    return env


def _answer_with_seg(tokenizer, seg_id, eos_id):
    """Logits hook: the model says 'Sure, it is [SEG].' whatever its random weights prefer."""
    script = tokenizer(" Sure, it is", add_special_tokens=False).input_ids + [seg_id] \
        + tokenizer(".", add_special_tokens=False).input_ids + [eos_id]

    def hook(step, logits):
        logits = logits.clone()
        logits[:, script[min(step, len(script) - 1)]] += 1e4
        return logits
    return hook


def test_say_text_drops_the_marker():
    assert say_text("Sure, it is [SEG] .") == "Sure, it is."
    assert say_text("Sure, it is [SEG].") == "Sure, it is."
    assert say_text("[SEG]") == ""
    assert say_text("Here: [SEG] and [SEG], done") == "Here: and, done"
    assert say_text("No, there is no dog, but a cat.") == "No, there is no dog, but a cat."
    assert say_text("Sure,  [SEG] and [SEG] .") == "Sure, and."
    assert printable("a\x1bb\nc") == "a\\x1bb\nc"


def test_argument_errors():
    for argv in (["--image", "x.jpg"], ["--query", "q"], ["--json"], ["--conv_type", "chatml"], ["--precision", "fp8"]):
        with pytest.raises(SystemExit):
            demo.parse_args(argv)
    for argv, what in ((["--max_new_tokens", "0"], "max_new_tokens"), (["--device", "tpu7"], "not a torch device")):
        with pytest.raises(InputError, match=what):
            _load(["--pretrained_model_path", "tiny-random", "--precision", "fp32", *argv])
    args = demo.parse_args([])
    assert args.conv_type == "vicuna_v1" and args.max_new_tokens == 512 and args.precision is None
    from engine.build import resolve_device_and_precision
    for device, precision in (("cpu", "fp32"), ("cuda", "bf16")):  # cuda: resolved only where there is one
        if device == "cpu" or torch.cuda.is_available():
            args = demo.parse_args(["--device", device])
            assert resolve_device_and_precision(args) == device and args.precision == precision
    args = demo.parse_args(["--device", "cpu", "--precision", "bf16"])
    resolve_device_and_precision(args)
    assert args.precision == "bf16"  # said explicitly, kept
    args = demo.parse_args([])
    assert args.vis_save_dir == "./demo_directory"


def test_one_query_writes_mask_overlay_answer(loaded, tmp_path):
    cfg = loaded.model.config
    predictor = _predictor(loaded, _answer_with_seg(loaded.tokenizer, cfg.seg_token_id, cfg.llm.eos_token_id), 32)
    result = run_query(predictor, _settings(tmp_path), SHAPES, "  Is there a red square? ")
    assert result.question == "Is there a red square?"
    assert "[SEG]" in result.raw_answer and result.say == "Sure, it is."
    assert result.num_seg == 1 and result.image_size == (320, 480)
    mask = np.asarray(Image.open(result.mask_path))
    assert mask.shape == (320, 480) and set(np.unique(mask)) <= {0, 255}
    assert result.mask_pixels == int((mask == 255).sum()) and result.see == (result.mask_pixels > 0)
    assert result.see and result.mask_pixels > 0  # tiny-random (seed 0) draws a non-empty mask here
    overlay = np.asarray(Image.open(result.overlay_path)).astype(int)
    expected = overlay_mask(load_image(SHAPES).rgb, mask == 255).astype(int)
    assert overlay.shape == (320, 480, 3) and np.abs(overlay - expected).mean() < 3  # JPEG-close
    assert open(result.answer_path, encoding="utf-8").read().strip() == result.say
    saved = json.load(open(os.path.join(result.output_dir, "result.json")))
    assert saved["raw_answer"] == result.raw_answer and saved["see"] == result.see
    assert result.output_dir == str(tmp_path / "vis" / "shapes" / "000_is-there-a-red-square")
    again = run_query(predictor, _settings(tmp_path), SHAPES, "Is there a red square?")
    assert again.output_dir.endswith("001_is-there-a-red-square")  # never overwrites
    assert again.raw_answer == result.raw_answer and again.mask_pixels == result.mask_pixels  # greedy: repeatable


def test_no_seg_means_see_false_and_blank_mask(loaded, tmp_path):
    eos = loaded.model.config.llm.eos_token_id
    words = loaded.tokenizer(" No, there is none.", add_special_tokens=False).input_ids + [eos]

    def no_seg(step, logits):
        logits = logits.clone()
        logits[:, words[min(step, len(words) - 1)]] += 1e4
        return logits
    result = run_query(_predictor(loaded, no_seg, 32), _settings(tmp_path), SHAPES, "Is there a cat?")
    assert not result.see and result.num_seg == 0 and result.say == "No, there is none."
    assert np.asarray(Image.open(result.mask_path)).max() == 0


def test_conv_type_is_honoured(loaded, monkeypatch, tmp_path):
    import model.predictor

    seen = []
    real = model.predictor.tokenize_with_image
    monkeypatch.setattr(model.predictor, "tokenize_with_image",
                        lambda prompt, tok: seen.append(prompt) or real(prompt, tok))
    for conv in ("vicuna_v1", "llava_v1"):
        run_query(_predictor(loaded, conv_type=conv), _settings(tmp_path), SHAPES, "Is there a red square?")
    assert "curious user" in seen[0] and "curious human" in seen[1]
    assert seen[0].endswith("USER: <im_start><image><im_end>\nIs there a red square? ASSISTANT:")


def test_bad_questions(loaded, tmp_path):
    predictor = _predictor(loaded)
    with pytest.raises(PromptError, match="empty question"):
        run_query(predictor, _settings(tmp_path), SHAPES, "   ")
    with pytest.raises(PromptError, match="must not contain"):
        run_query(predictor, _settings(tmp_path), SHAPES, "<image> what?")
    with pytest.raises(PromptError, match="question too long"):
        run_query(predictor, _settings(tmp_path), SHAPES, "word " * 2000)
    assert not os.path.exists(tmp_path / "vis")  # nothing written for refused queries


def _odd_images(tmp_path):
    """One file of every awkward kind the loop must survive or answer."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    paths = {}
    paths["gray"] = tmp_path / "gray.png"
    Image.fromarray(rgb[..., 0], mode="L").save(paths["gray"])
    paths["rgba"] = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, rgb[..., :1]]), mode="RGBA").save(paths["rgba"])
    paths["palette"] = tmp_path / "palette.png"
    Image.fromarray(rgb).convert("P").save(paths["palette"])
    paths["sixteen"] = tmp_path / "sixteen.png"
    cv2.imwrite(str(paths["sixteen"]), rgb[..., 0].astype(np.uint16) * 257)
    paths["exif"] = tmp_path / "exif.jpg"
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(paths["exif"], exif=exif.tobytes())
    paths["large"] = tmp_path / "large.jpg"
    Image.fromarray(np.kron(rgb, np.ones((20, 20, 1), np.uint8))).save(paths["large"])  # 800 x 1200
    paths["text"] = tmp_path / "notes.jpg"
    paths["text"].write_text("not an image")
    return {k: str(v) for k, v in paths.items()}


def test_interactive_loop_survives_bad_input(loaded, tmp_path):
    images = _odd_images(tmp_path)
    typed = ["", "Is there a red square?", str(tmp_path / "missing.jpg"),
             "Is there a red square?", images["text"],
             "Is there a red square?", str(tmp_path),
             "<image>", ]
    good = ["gray", "rgba", "palette", "sixteen", "exif", "large"]
    for name in good:
        path = f"'{images[name]}' " if name == "gray" else images[name]  # quotes as a drag-and-drop adds
        typed += [f"Where is the {name} thing?", path]
    typed += ["Is there a red square?", "quit"]
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        return typed.pop(0)
    out = io.StringIO()
    demo.interactive(_predictor(loaded), _settings(tmp_path, max_image_pixels=500_000), read=read, out=out)
    text = out.getvalue()
    assert not typed, "the loop stopped early"
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 5, text
    assert "empty question" in errors[0] and "missing.jpg: no such file" in errors[1]
    assert "notes.jpg: not an image file" in errors[2] and "is a directory" in errors[3]
    assert "must not contain" in errors[4]
    assert text.count("* Object Existence (See):") == len(good)
    assert "note: image downscaled from 1200x800" in text and "masks are saved at the original size" in text
    assert prompts[:3] == ["Human Prompts: ", "Human Prompts: ", "Image path: "]
    folders = sorted(os.listdir(tmp_path / "vis"))
    assert folders == sorted(["gray", "rgba", "palette", "sixteen", "exif", "large"])
    exif_mask = np.asarray(Image.open(tmp_path / "vis" / "exif" / "000_where-is-the-exif-thing" / "seg_mask.png"))
    assert exif_mask.shape == (60, 40)  # upright: EXIF orientation 6 swaps the sides
    large_dir = tmp_path / "vis" / "large" / "000_where-is-the-large-thing"
    large = json.load(open(large_dir / "result.json"))
    assert large["image_size"] == [800, 1200]  # masks at the file's size, though the model saw a smaller copy
    assert np.asarray(Image.open(large_dir / "seg_mask.png")).shape == (800, 1200)
    overlay = np.asarray(Image.open(large_dir / "seg_overlay.jpg"))
    assert overlay.shape[0] * overlay.shape[1] <= 500_000  # drawn on the copy the model saw


def test_interactive_loop_ends_on_eof(loaded, tmp_path):
    def read(prompt):
        raise EOFError
    demo.interactive(_predictor(loaded), _settings(tmp_path), read=read, out=io.StringIO())


def test_one_shot_script_json(tmp_path):
    vis = tmp_path / "vis"
    cmd = [sys.executable, os.path.join(ROOT, "demo.py"), "--pretrained_model_path", "tiny-random", "--device", "cpu",
           "--precision", "fp32", "--image", SHAPES, "--query", "Is there a red square?", "--json",
           "--max_new_tokens", FEW_TOKENS, "--vis_save_dir", str(vis)]
    run = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
                         env=_script_env())
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)  # stdout holds exactly one JSON object
    assert set(result) >= {"see", "say", "raw_answer", "output_dir", "mask_path", "overlay_path", "answer_path"}
    assert isinstance(result["see"], bool) and result["image_size"] == [320, 480]
    assert np.asarray(Image.open(result["mask_path"])).shape == (320, 480)
    assert np.asarray(Image.open(result["overlay_path"])).shape == (320, 480, 3)
    assert os.path.dirname(result["mask_path"]) == str(vis / "shapes" / "000_is-there-a-red-square")
    assert "untrained" in run.stderr



def test_one_shot_bad_image_exits_1_with_one_line(tmp_path, capsys):
    code = demo.main(["--pretrained_model_path", "tiny-random", "--device", "cpu", "--precision", "fp32",
                      "--image", str(tmp_path / "nope.png"), "--query", "Is there a red square?", "--json",
                      "--vis_save_dir", str(tmp_path / "vis")])
    out, err = capsys.readouterr()
    assert code == 1
    assert json.loads(out)["error"].endswith("nope.png: no such file")
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert not os.path.exists(tmp_path / "vis")


def test_interactive_script_through_a_pseudo_terminal(tmp_path):
    vis = tmp_path / "vis"
    child = pexpect.spawn(sys.executable, [os.path.join(ROOT, "demo.py"), "--pretrained_model_path", "tiny-random",
                                           "--device", "cpu", "--precision", "fp32", "--max_new_tokens", FEW_TOKENS,
                                           "--vis_save_dir", str(vis)],
                          cwd=str(tmp_path), env=_script_env(), encoding="utf-8", codec_errors="replace",
                          timeout=SCRIPT_TIMEOUT_S)
    try:
        child.expect_exact("Human Prompts: ")
        child.sendline("   ")
        child.expect_exact("error: empty question")
        child.expect_exact("Human Prompts: ")
        os.write(child.child_fd, b"caf\xe9 \xff?\r")  # bytes that are not UTF-8
        child.expect_exact("error: the question is not valid text")
        child.expect_exact("Human Prompts: ")
        child.sendline("Is there a red square?")
        child.expect_exact("Image path: ")
        child.sendline(str(tmp_path / "does_not_exist.jpg"))
        child.expect(r"error: \S*does_not_exist\.jpg: no such file")
        child.expect_exact("Human Prompts: ")  # the loop goes on
        child.sendline("Is there a red square?")
        child.expect_exact("Image path: ")
        child.sendline(SHAPES)
        child.expect(r"\* Object Existence \(See\): (True|False)")
        child.expect(r"\* Text Response \(Say\): ")
        child.expect(r"\* Segmentation Paths \(Segment\): (\S+)\r?\n")
        folder = child.match.group(1)
        child.expect_exact("Human Prompts: ")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert folder == str(vis / "shapes" / "000_is-there-a-red-square")
    assert sorted(os.listdir(folder)) == ["answer.txt", "result.json", "seg_mask.png", "seg_overlay.jpg"]


def test_sasp_flags_and_visualize(loaded, tmp_path):
    with pytest.raises(InputError, match="SasP is off"):  # a knob with nothing to tune
        _load(["--pretrained_model_path", "tiny-random", "--precision", "fp32", "--device", "cpu", "--num_points", "5"])
    plain = run_query(_predictor(loaded), _settings(tmp_path, visualize=True), SHAPES, "Is there a red square?")
    assert plain.sasp_paths == [] and any("does not use SasP" in n for n in plain.notes)

    read = _load(["--pretrained_model_path", "tiny-random", "--precision", "fp32", "--device", "cpu", "--use_sasp",
                  "--num_points", "5", "--t_pos", "0.7"])
    cfg = read.model.config
    assert cfg.sasp.num_points == 5 and cfg.sasp.t_pos == 0.7
    loaded_read = type(loaded)(read.model, read.tokenizer, read.clip_transform, read.sam_transform)
    hook = _answer_with_seg(read.tokenizer, cfg.seg_token_id, cfg.llm.eos_token_id)
    result = run_query(_predictor(loaded_read, hook, 32), _settings(tmp_path, visualize=True), SHAPES,
                            "Is there a red square?")
    assert [os.path.basename(p) for p in result.sasp_paths] == ["sasp.png"]
    assert os.path.dirname(result.sasp_paths[0]) == result.output_dir
    assert np.asarray(Image.open(result.sasp_paths[0])).ndim == 3
    seg = torch.tensor([cfg.seg_token_id])
    never_seg = _predictor(loaded_read, lambda step, logits: logits.index_fill(1, seg, -1e4))
    no_seg = run_query(never_seg, _settings(tmp_path, visualize=True), SHAPES, "Is there a red square?")
    assert no_seg.num_seg == 0 and no_seg.sasp_paths == [] and any("no [SEG]" in n for n in no_seg.notes)


def test_released_read_checkpoint_directory(tmp_path):
    """A checkpoint directory in the released layout: READ turns SasP on by itself, flags tune it."""
    from model.builder import LoadedSesame
    from model.tiny import write_tiny_released

    ckpt = str(tmp_path / "read_ckpt")
    write_tiny_released(ckpt, architecture="READForCausalLM", llama_vocab=False)
    read = _load(["--pretrained_model_path", ckpt, "--precision", "fp32", "--device", "cpu", "--num_points", "7",
                  "--vision_tower", os.path.join(ckpt, "vision_tower")])
    cfg = read.model.config
    assert cfg.sasp.num_points == 7 and cfg.architecture == "READForCausalLM"
    hook = _answer_with_seg(read.tokenizer, cfg.seg_token_id, cfg.llm.eos_token_id)
    loaded_read = LoadedSesame(read.model, read.tokenizer, read.clip_transform, read.sam_transform)
    result = run_query(_predictor(loaded_read, hook, 32), _settings(tmp_path, visualize=True), SHAPES,
                            "Is there a red square?")
    assert result.say == "Sure, it is." and result.num_seg == 1
    assert [os.path.basename(p) for p in result.sasp_paths] == ["sasp.png"]
    with pytest.raises(FileNotFoundError, match="missing_ckpt"):
        _load(["--pretrained_model_path", str(tmp_path / "missing_ckpt"), "--device", "cpu"])
