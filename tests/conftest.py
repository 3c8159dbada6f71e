import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="session")
def tiny_tok():
    from model.tiny import tiny_tokenizer

    return tiny_tokenizer(os.path.join(ROOT, "assets", "tiny_tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tiny_tok):
    return tiny_tok[0]


@pytest.fixture(scope="session")
def token_ids(tiny_tok):
    return tiny_tok[1]


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A LLaMA-sized sentencepiece model trained on the fly (the released tokenizer's stand-in)."""
    from model.tiny import llama_sized_sentencepiece

    return llama_sized_sentencepiece(str(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """The synthetic data root (every on-disk format the loaders read), generated once."""
    from dataset.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic_data")
    generate(str(root), seed=0, num_images=12)
    return str(root)
