"""README.md's examples run as written, and every relative link of README.md and docs/ resolves.

The convention: a fenced block of README.md whose info string is exactly ``python`` or ``bash``
claims to run as written, and is run here; every other block (``console``, ``text``, ...) is
shown, not run. Each runnable block is one of the three uses the README names:

- the op on tensors (a ``python`` block without ``EPATrainer``): executed as it stands, on the
  small tensors it builds itself;
- epa-train on the shared HH-RLHF file (the ``bash`` block, run from the repository root, as the
  README says): the same command in a real process, with the test appending flags that make the run
  tiny (later flags win: the tiny model's sizes, 2 steps, short sequences) and its output directory
  moved under tmp_path; skipped where ../shared/data is missing;
- the one-import switch in a TRL script (the ``python`` block with ``EPATrainer``): the README names
  ``model``, ``tokenizer`` and ``dataset`` in the prose above it; the test binds them to a tiny
  Llama (loaded from a directory, as a user's model is), a tokenizer trained on the data and a 16-row ``datasets.Dataset``, and replaces
  ``EPAConfig`` by one that keeps the block's arguments but runs 2 steps on the CPU into tmp_path.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HH_RLHF, NEEDS_HH_RLHF, TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = ("python", "bash")
FENCE = re.compile(r"^```(\S*)\s*$")


def fenced_blocks(path: Path) -> list[tuple[str, str]]:
    """(info string, text) of each fenced block of a Markdown file."""
    blocks, info, lines = [], None, []
    for line in path.read_text().splitlines():
        fence = FENCE.match(line)
        if fence and info is None:
            info, lines = fence.group(1), []
        elif line.startswith("```") and info is not None:
            blocks.append((info, "\n".join(lines) + "\n"))
            info = None
        elif info is not None:
            lines.append(line)
    assert info is None, f"{path}: a fenced block is not closed"
    return blocks


def runnable(kind: str) -> list[str]:
    return [text for info, text in fenced_blocks(README) if info == kind]


def op_block() -> str:
    (block,) = [b for b in runnable("python") if "EPATrainer" not in b]
    return block


def trl_block() -> str:
    (block,) = [b for b in runnable("python") if "EPATrainer" in b]
    return block


def test_readme_has_the_three_runnable_uses():
    assert len(runnable("python")) == 2 and len(runnable("bash")) == 1
    assert {info for info, _ in fenced_blocks(README)} <= {"python", "bash", "console", "text"}


def test_the_op_example_runs(capsys):
    namespace: dict = {}
    exec(compile(op_block(), "README.md (the op on tensors)", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and torch.isfinite(namespace["dpo"])
    assert namespace["hidden"].grad is not None and namespace["logits"].grad is not None
    assert capsys.readouterr().out.startswith("EPA ")


@NEEDS_HH_RLHF
def test_the_epa_train_example_runs_on_the_shared_data(tmp_path):
    (block,) = runnable("bash")
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[0] == "epa-train"
    flags = argv[1:]
    dataset = flags[flags.index("--dataset") + 1]
    assert (ROOT / dataset).resolve() == HH_RLHF.resolve()  # the path the README gives, from the repository root
    out = tmp_path / "run"
    tiny = [*TINY_MODEL, "--max-steps", "2", "--batch-size", "2", "--max-length", "96", "--max-prompt-length", "48",
            "--eval-fraction", "0.01", "--output-dir", str(out)]
    # -P: the installed package, not the source tree of the working directory
    command = [sys.executable, "-P", "-m", "epa_ext.train", *flags, *tiny]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]
    assert (out / "final" / "config.json").is_file()


def test_the_trl_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    import epa_ext.integrations.trl as integration
    from epa_ext.train.modeling import build_tiny_model, train_tiny_tokenizer

    rows = [{"prompt": f"Q{i}: say", "chosen": " yes good" * (1 + i % 3), "rejected": " no bad" * (1 + i % 2)}
            for i in range(16)]
    tokenizer = train_tiny_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], 320)
    # saved and loaded as a user's model is, so that TRL can load the reference copy from its path
    build_tiny_model(len(tokenizer), 32, 2, 128, seed=0).save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")

    class SmallConfig(integration.EPAConfig):
        """The block's EPAConfig, run for 2 steps on the CPU, writing only into tmp_path."""

        def __init__(self, **fields):
            fields.update(output_dir=str(tmp_path / "trl"), max_steps=2, use_cpu=True, report_to="none",
                          save_strategy="no", disable_tqdm=True, max_length=64, bf16=False,
                          gradient_checkpointing=False)
            super().__init__(**fields)

    monkeypatch.setattr(integration, "EPAConfig", SmallConfig)  # what the block's import binds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads
    try:
        namespace = {"model": model, "tokenizer": tokenizer, "dataset": Dataset.from_list(rows)}
        exec(compile(trl_block(), "README.md (TRL)", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    trainer = namespace["trainer"]
    assert isinstance(trainer, integration.EPATrainer) and trainer.args.num_weak == 1
    assert trainer.state.global_step == 2


# --- links ----------------------------------------------------------------------------------------

PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose_lines(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub gives a Markdown file (lower case; punctuation other than - and _
    dropped; spaces to hyphens; a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    for line in prose_lines(path):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for line in prose_lines(page):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            if not resolved.exists():
                broken.append(f"{target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
