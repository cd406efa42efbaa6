"""Shared fixtures: no network, a tiny random BERT 'checkpoint', small learnable datasets."""

import atexit
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

# Before any Hugging Face import: a hidden download must fail loudly, and caches stay private.
_CACHE = tempfile.mkdtemp(prefix="finetune-tests-hf-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)  # each pytest process's own, gone with it
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = _CACHE
os.environ["HF_DATASETS_CACHE"] = os.path.join(_CACHE, "datasets")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel test workers (pytest -n 2) on a 2-core machine: one compute thread each, in this
    # process and in the subprocesses it starts. Tiny models gain nothing from a second thread,
    # and two workers with two threads each on two cores slow each other down many times over.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

# The bf16 leg: `FINETUNE_TEST_CPU_BF16=1 python -m pytest ...` runs the whole suite as on a CPU with
# native bf16 (train.mixed_precision=auto -> bf16), whatever this CPU has, in this process (below,
# pytest_configure) and in every Python process a test starts (tests/cpu_bf16/sitecustomize.py on
# PYTHONPATH). The default run covers bf16 for the end-to-end tests through `precision_leg`.
CPU_BF16_DIR = Path(__file__).resolve().parent / "cpu_bf16"
CPU_BF16 = os.environ.get("FINETUNE_TEST_CPU_BF16") == "1"


def subprocess_pythonpath(*dirs) -> str:
    """PYTHONPATH for a Python subprocess: ``dirs``, after the bf16 leg's folder when it is on."""
    return os.pathsep.join([str(CPU_BF16_DIR)] * CPU_BF16 + [str(d) for d in dirs])


if CPU_BF16:
    os.environ["PYTHONPATH"] = subprocess_pythonpath(*filter(None, [os.environ.get("PYTHONPATH")]))


def pytest_configure(config):
    if CPU_BF16:
        import finetune.cli

        check = finetune.cli.cpu_has_fast_bf16  # already forced in an xdist worker (sitecustomize)
        check = getattr(check, "native", check)
        config.stash[NATIVE_BF16] = check()
        finetune.cli.cpu_has_fast_bf16 = forced_bf16(check)


NATIVE_BF16 = pytest.StashKey[bool]()


def forced_bf16(native):
    """cpu_has_fast_bf16 answering True; ``.native``: the real check (as tests/cpu_bf16 does it)."""
    check = lambda: True  # noqa: E731
    check.native = native
    return check


def pytest_collection_modifyitems(config, items):
    """In the bf16 leg on a CPU without native bf16, bf16 matmuls are emulated (about 1 GFLOP/s): the
    tests that train the packaged MiniLM on ../shared/data would take hours there, so they are left to
    the default leg (and to the bf16 leg on a bf16 CPU); the tiny-model tests cover the same code."""
    longest_first(items)
    if CPU_BF16 and not config.stash.get(NATIVE_BF16, True):
        skip = pytest.mark.skip(reason="bf16 leg on a CPU without native bf16: MiniLM under emulated bf16 takes hours")
        for item in items:
            if item.get_closest_marker("integration"):
                item.add_marker(skip)


def pytest_report_header(config):
    from finetune.cli import resolve_mixed_precision

    return f"finetune: train.mixed_precision=auto resolves to {resolve_mixed_precision('auto', True)!r} on this CPU" + (
        " (forced by FINETUNE_TEST_CPU_BF16=1)" if CPU_BF16 else "")


def free_port() -> int:
    """A TCP port nothing listens on now (for distributed rendezvous in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_user_env(home: Path) -> dict:
    """The environment of a user's shell for commands run as subprocesses: offline, this
    virtual environment first on PATH, a fresh HOME (so no cache or config of ours leaks in)."""
    env = {"HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home),
           # scripts/launch.sh's rendezvous port: parallel test workers must not share 29500.
           "MAIN_PORT": str(free_port())}  # fmt: skip
    # The test worker's thread budget (see above) holds for the commands it runs too.
    env.update({k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ})
    if CPU_BF16:
        env["PYTHONPATH"] = subprocess_pythonpath()
    return env

POSITIVE = "good great fine nice lovely superb".split()
NEGATIVE = "bad awful poor dull boring terrible".split()
NEUTRAL = "the a movie film plot story was is very really this it and acting".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL


# The longest test files, longest first. Under `pytest -n 2` (whole files per worker) they start
# first, so that the many short files fill in around them instead of one long file running alone
# at the end; without xdist the order of files does not matter.
LONGEST_FIRST = ["test_integration_agnews.py", "test_readme.py", "test_integration.py", "test_bad_inputs.py",
                 "test_scripts.py", "test_resume.py", "test_recipes.py", "test_distributed.py"]  # fmt: skip


def longest_first(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def make_tokenizer():
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    ids = tok("the movie was great")["input_ids"]
    assert tok.unk_token_id not in ids, "tiny tokenizer maps known words to [UNK]"
    return tok


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A 'pre-trained' BERT encoder without a classification head, as Hub checkpoints come."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bert")))


def sentiment_rows(n: int, seed: int, labels=("negative", "positive")):
    """Sentences whose label is decided by one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % len(labels)
        word = rng.choice(POSITIVE if label == 1 else NEGATIVE)
        filler = rng.sample(NEUTRAL, rng.randint(2, 8))
        filler.insert(rng.randint(0, len(filler)), word)
        rows.append((" ".join(filler), labels[label]))
    rng.shuffle(rows)
    return rows


def write_tsv(path: Path, rows, header=("sentence", "label")) -> str:
    lines = (["\t".join(header)] if header else []) + [f"{t}\t{l}" for t, l in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def toy_files(tmp_path):
    """train.tsv (160 rows) and validation.tsv (41 rows: not a multiple of any batch size)."""
    return {
        "train": write_tsv(tmp_path / "train.tsv", sentiment_rows(160, seed=1)),
        "validation": write_tsv(tmp_path / "validation.tsv", sentiment_rows(41, seed=2)),
    }
