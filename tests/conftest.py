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
