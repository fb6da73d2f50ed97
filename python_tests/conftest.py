import json
import os
import shutil
import sys
from pathlib import Path

# MKL may choose its code path from the data's alignment, so the same computation in two
# processes can differ in the last bit; its conditional bitwise reproducibility mode (read when
# MKL loads, hence before torch) lets tests compare runs exactly. Subprocesses inherit it.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
# Under pytest-xdist (make test runs two workers on two cores) each worker, and every process its
# tests start, computes on one thread: two workers of two OpenMP threads each would spin-wait for
# each other's cores (the tiny models' training steps ran 10-20x slower so). Read by OpenMP when
# torch loads, hence here; a test that wants more threads sets them itself.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- the trainer's tests (test_train*.py) --------------------------------------------------------

TEST_DATA = Path(__file__).resolve().parent / "data"
PREFS = TEST_DATA / "prefs.jsonl"
# the real data set of ../shared (the repository's sibling directory), when present
HH_RLHF = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"
NEEDS_HH_RLHF = pytest.mark.skipif(not HH_RLHF.exists(), reason=f"{HH_RLHF} (../shared/data) is not present")
# a tiny model and short sequences: a step takes milliseconds (later flags override earlier ones)
TINY_MODEL = ["--model", "tiny", "--tiny-hidden-size", "32", "--tiny-layers", "1", "--tiny-vocab-size", "300"]
SHORT = ["--max-length", "96", "--max-prompt-length", "48", "--lr", "1e-3"]
TINY = TINY_MODEL + SHORT


def epa_train_command(out: Path, *extra: str, dataset: Path = PREFS, model: list[str] = TINY_MODEL) -> list[str]:
    """The command line of a real epa-train process (on the tiny model unless model says). -P: the
    working directory is not put on sys.path, so a test run from the source tree (make test) starts
    the installed package, not the uncompiled source next to it."""
    return [sys.executable, "-P", "-m", "epa_ext.train", "--dataset", str(dataset), "--output-dir", str(out), *model,
            *SHORT, *extra]


def train_in_process(out: Path, *extra: str, dataset: Path = PREFS) -> list[dict]:
    """epa_ext.train.trainer.run on the tiny model; its metrics records."""
    from epa_ext.train.config import parse_config
    from epa_ext.train.trainer import run

    return run(parse_config(["--dataset", str(dataset), "--output-dir", str(out), *TINY, *extra]))


def free_port() -> int:
    """A TCP port no process listens on now: for a process group's rendezvous, so that two test
    processes (pytest-xdist workers) never both take torch's default 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun() -> str:
    return shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The weights a run saved in final/."""
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def initial_tiny_model(out: Path):
    """The model a tiny run started from (its seed and sizes as TINY gives them)."""
    from transformers import AutoTokenizer

    from epa_ext.train.modeling import build_tiny_model

    return build_tiny_model(len(AutoTokenizer.from_pretrained(out / "final")), 32, 1, 96 + 8, seed=0)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(records: list[dict]) -> list[float]:
    """The training losses of metrics records (evaluation lines left out)."""
    return [r["loss"] for r in records if "loss" in r]


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def tiny_tokenizer(chat_template: str | None = None):
    """The tiny model's tokenizer (the package's own helper), trained on the fixture texts."""
    from epa_ext.train.modeling import train_tiny_tokenizer

    texts = [line for path in sorted(TEST_DATA.glob("*.jsonl")) for line in path.read_text().splitlines()]
    tokenizer = train_tiny_tokenizer(texts, 300)
    tokenizer.chat_template = chat_template
    return tokenizer
