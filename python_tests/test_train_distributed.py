"""epa-train across processes on the CPU (gloo): DDP and FSDP2 (fully_shard) on the three-matmul
fused-linear losses, whose lm_head gradient is formed in the forward and only scaled in backward.

- The reduced gradients themselves: 2 ranks, each with its own half of a global batch (and with
  gradient accumulation), hold the gradients of the whole batch in one process, parameter by
  parameter, the lm_head's weight and bias included: DDP's reducer and FSDP2's reduce-scatter see
  the gradient the op formed. For the three-matmul path (the trainer's) and the recomputing one.
- Real `epa-train` runs under torchrun: 2 ranks of 2 prompts against 1 process of 4 give the same
  step losses and final weights, for DDP (with --grad-accum 2; and with padding-free, length-grouped
  batches against padded ones) and for --fsdp (and its resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import (epa_train_command, final_weights, free_port, initial_tiny_model, read_metrics, torchrun,
                      train_in_process, train_losses)
from numerics import TOLERANCES, WEIGHT_CHANGE_RTOL, assert_paths_agree

from epa_ext import IGNORE_INDEX

RTOL, ATOL = TOLERANCES[torch.float32]  # two runs whose reductions are ordered differently
WORLD_SIZE = 2
STRATEGIES = ("ddp", "fsdp")
ON_CPU = ["--device", "cpu"]  # gloo on the CPU, also where a GPU is present (with one, rank 1 would have none)

# --- the reduced gradients ------------------------------------------------------------------------

VOCAB, HIDDEN, LENGTH, PROMPTS = 64, 32, 12, 4  # PROMPTS: the global batch, split over the ranks


@dataclasses.dataclass(frozen=True)
class Variant:
    """One gradient computation: the loss, the fused-linear path (three-matmul: the op forms the
    gradient in the forward, what epa-train runs; recomputing: differentiable_logps=True), the
    head (tied to the embedding as the tiny model's, or a separate weight with a bias) and the
    micro-steps each rank accumulates before the gradients are reduced."""

    loss: str
    path: str
    head: str
    micro_steps: int

    @property
    def name(self) -> str:
        return f"{self.loss}-{self.path}-{self.head}-{self.micro_steps}micro"


VARIANTS = [
    Variant("epa", "three-matmul", "tied", 1),
    Variant("epa", "three-matmul", "untied+bias", 2),
    Variant("dpo", "three-matmul", "untied+bias", 1),
    Variant("epa", "recomputing", "tied", 2),
    Variant("dpo", "recomputing", "untied+bias", 1),
]


def global_batch(loss: str) -> dict[str, torch.Tensor]:
    """PROMPTS prompts of C candidates (EPA: chosen, one strong, one weak negative, one of them
    masked; DPO: chosen, rejected), rows candidate-major, right-padded to different lengths."""
    candidates = 3 if loss == "epa" else 2
    generator = torch.Generator().manual_seed(1)
    rows = candidates * PROMPTS
    input_ids = torch.randint(3, VOCAB, (rows, LENGTH), generator=generator)
    lengths = torch.randint(LENGTH // 2 + 2, LENGTH + 1, (rows,), generator=generator)
    attention_mask = torch.arange(LENGTH) < lengths[:, None]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    answer = LENGTH // 2  # the prompt is the first half; logits at t predict token t + 1
    labels[:, answer - 1:-1] = input_ids[:, answer:]
    labels[~attention_mask.roll(-1, dims=1)] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
    candidate_mask = torch.ones(PROMPTS, candidates, dtype=torch.bool)
    if loss == "epa":
        candidate_mask[1, 2] = False
    return {"input_ids": input_ids, "attention_mask": attention_mask.long(), "labels": labels,
            "ref_logps": -2.0 * (labels != IGNORE_INDEX).sum(-1) - torch.rand(rows, generator=generator),
            "candidate_mask": candidate_mask}


def prompts_of(batch: dict[str, torch.Tensor], prompts: list[int]) -> dict[str, torch.Tensor]:
    """The rows of these prompts, still candidate-major (row c * B + b is candidate c of prompt b)."""
    candidates = batch["candidate_mask"].shape[1]
    rows = [c * PROMPTS + b for c in range(candidates) for b in prompts]
    return {k: v[prompts] if k == "candidate_mask" else v[rows] for k, v in batch.items()}


def preference_loss(variant: Variant):
    """The trainer's PreferenceLoss on the tiny Llama (seeded: the same on every rank)."""
    from torch import nn

    from epa_ext.preference.loss import LossSpec, PreferenceLoss
    from epa_ext.train.modeling import build_tiny_model

    model = build_tiny_model(VOCAB, HIDDEN, 1, LENGTH, seed=0)
    if variant.head == "untied+bias":
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone())
        head.bias = nn.Parameter(torch.linspace(-0.5, 0.5, VOCAB))
        model.config.tie_word_embeddings = False
    return PreferenceLoss(model, LossSpec(variant.loss, 0.1, num_strong=1, weak_weight=0.5))


def selected_path(variant: Variant):
    """The recomputing path through PreferenceLoss: its fused-linear functions with
    differentiable_logps=True (epa-train itself always takes the three-matmul path)."""
    if variant.path == "three-matmul":
        return contextlib.nullcontext()
    import epa_ext

    return mock.patch.multiple(
        "epa_ext.preference.loss",
        fused_linear_dpo_loss=functools.partial(epa_ext.fused_linear_dpo_loss, differentiable_logps=True),
        fused_linear_epa_loss=functools.partial(epa_ext.fused_linear_epa_loss, differentiable_logps=True))


def accumulate(model, variant: Variant, prompts: list[int]) -> dict:
    """variant.micro_steps forwards and backwards over these prompts of the global batch (equal
    shares, each loss / micro_steps, DDP's all-reduce on the last only: as the trainer's step);
    the summed loss and what tells the path: the op behind the loss and whether the returned
    log-probs carry a graph."""
    from epa_ext.train.runtime import no_sync

    batch = global_batch(variant.loss)
    per_step = len(prompts) // variant.micro_steps
    total, backward_of, seq_has_graph = 0.0, set(), set()
    for step in range(variant.micro_steps):
        share = prompts_of(batch, prompts[step * per_step:(step + 1) * per_step])
        with no_sync(model, step == variant.micro_steps - 1), selected_path(variant):
            loss, seq, *_ = model(**share)
        (loss / variant.micro_steps).backward()
        total += loss.item() / variant.micro_steps
        backward_of.add(type(loss.grad_fn).__name__)
        seq_has_graph.add(seq.requires_grad)
    return {"loss": total, "backward_of": backward_of, "seq_has_graph": seq_has_graph}


def full_gradients(loss_module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, whole (FSDP2's sharded gradients gathered: a collective)."""
    from torch.distributed.tensor import DTensor

    return {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
            for name, p in loss_module.named_parameters()}


def rank_gradients(rank: int, rendezvous: str, out: str) -> None:
    """One of WORLD_SIZE spawned processes: for each strategy and variant, the trainer's wrapping
    (runtime.distribute: DDP, or fully_shard on each decoder layer and the whole) of a fresh
    model, this rank's half of the global batch, and the gradients after the reduction; saved."""
    from epa_ext.train.config import TrainConfig
    from epa_ext.train.runtime import Runtime, distribute

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE)
    runtime = Runtime(rank, WORLD_SIZE, torch.device("cpu"))
    share = PROMPTS // WORLD_SIZE
    mine = list(range(rank * share, (rank + 1) * share))
    results = {}
    try:
        for strategy in STRATEGIES:
            cfg = TrainConfig(dataset="unused", output_dir="unused", fsdp=strategy == "fsdp")
            for variant in VARIANTS:
                loss_module = preference_loss(variant)
                model = distribute(loss_module, cfg, runtime)
                run = accumulate(model, variant, mine)
                results[strategy, variant.name] = {**run, "gradients": full_gradients(loss_module)}
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def reduced(tmp_path_factory) -> list[dict]:
    """Each rank's results (rank_gradients), from one spawn of WORLD_SIZE gloo processes."""
    out = tmp_path_factory.mktemp("reduced")
    mp.spawn(rank_gradients, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD_SIZE)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def one_process(variant: Variant, prompts: list[int]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The variant on these prompts in this process, unwrapped, in one micro-step."""
    loss_module = preference_loss(variant)
    run = accumulate(loss_module, dataclasses.replace(variant, micro_steps=1), prompts)
    return run, full_gradients(loss_module)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_two_ranks_reduce_to_the_gradients_of_the_global_batch(reduced, strategy, variant):
    """After backward (and DDP's all-reduce or FSDP2's reduce-scatter), each rank holds the
    gradient of the whole batch computed in one process, for every parameter, on the path the
    variant names; the ranks' losses average to the whole batch's."""
    everything, expected = one_process(variant, list(range(PROMPTS)))
    _, first_half = one_process(variant, list(range(PROMPTS // WORLD_SIZE)))
    op = f"epa_ext_linear_{variant.loss}_loss"
    three_matmul = variant.path == "three-matmul"
    assert (op in " ".join(everything["backward_of"])) == three_matmul, everything["backward_of"]
    assert everything["seq_has_graph"] == {not three_matmul}
    if variant.head == "untied+bias":
        assert {"policy.lm_head.weight", "policy.lm_head.bias"} <= expected.keys()
    for rank, results in enumerate(reduced):
        got = results[strategy, variant.name]
        assert got["backward_of"] == everything["backward_of"] and got["seq_has_graph"] == everything["seq_has_graph"]
        assert got["gradients"].keys() == expected.keys()
        for name, gradient in expected.items():
            # the halves' gradients differ from the whole's: one left unreduced would show
            assert (first_half[name] - gradient).norm() > 1e-2 * gradient.norm(), name
            assert_paths_agree(got["gradients"][name], gradient, what=f"rank {rank}: {name}")
    mean_loss = sum(results[strategy, variant.name]["loss"] for results in reduced) / WORLD_SIZE
    assert mean_loss == pytest.approx(everything["loss"], rel=RTOL, abs=ATOL)


# --- real epa-train runs under torchrun ------------------------------------------------------------


def torchrun_epa_train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """epa-train on the tiny model in WORLD_SIZE processes (torchrun --standalone: a free port)."""
    single = epa_train_command(out, *extra)
    # torchrun takes "-m module args", not the interpreter and its flags (it runs in out.parent)
    command = [torchrun(), "--standalone", "--nproc-per-node", str(WORLD_SIZE), *single[single.index("-m"):]]
    result = subprocess.run(command, cwd=out.parent, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_training(a: Path, b: Path) -> None:
    """The final weights of runs a and b (on the tiny model) changed the same, to
    WEIGHT_CHANGE_RTOL of each tensor's change."""
    first, second, initial = final_weights(a), final_weights(b), initial_tiny_model(a).state_dict()
    assert first.keys() == second.keys()
    for key, value in first.items():
        change = (value - initial[key]).norm()
        assert (second[key] - value).norm() <= WEIGHT_CHANGE_RTOL * change, key


def test_ddp_over_two_processes_trains_as_one(tmp_path):
    """DDP over 2 processes, 2 prompts each and 2 micro-steps per step (no_sync on the first),
    against 1 process with 4: the same losses, evaluation and final weights; with importance-
    corrected weak negatives, whose table rank 0 scores and every rank reads."""
    common = ["--max-steps", "3", "--grad-accum", "2", "--num-weak", "1", "--eval-fraction", "0.1",
              "--weak-correction", "importance", *ON_CPU]
    single, double = tmp_path / "single", tmp_path / "double"
    train_in_process(single, *common, "--batch-size", "4")
    torchrun_epa_train(double, *common, "--batch-size", "2")
    assert train_losses(read_metrics(double)) == pytest.approx(train_losses(read_metrics(single)), rel=RTOL, abs=ATOL)
    # the metrics that are means over prompts (rejected ones are means over present negatives,
    # averaged batch by batch as TRL does, so they depend on how the batches are cut)
    per_prompt = ("eval/loss", "eval/logps/chosen", "eval/rewards/chosen")
    evaluation = lambda out: [r[k] for r in read_metrics(out) if "eval/loss" in r for k in per_prompt]  # noqa: E731
    assert evaluation(double) == pytest.approx(evaluation(single), rel=RTOL, abs=ATOL)
    assert_same_training(single, double)


def test_ddp_with_prefix_shared_batches_trains_as_one_padded_process(tmp_path):
    """2 DDP ranks of 2 prompts with --prefix-sharing on (EPA, K = 1 and M = 2: three candidates
    share each prompt), against 1 process of 4 padded prompts: the same losses and final weights."""
    common = ["--max-steps", "3", "--num-weak", "2", "--eval-fraction", "0", *ON_CPU]
    single, double = tmp_path / "single", tmp_path / "double"
    train_in_process(single, *common, "--batch-size", "4")
    torchrun_epa_train(double, *common, "--batch-size", "2", "--prefix-sharing", "on")
    assert train_losses(read_metrics(double)) == pytest.approx(train_losses(read_metrics(single)), rel=RTOL, abs=ATOL)
    assert all(0 < r["decoder_tokens_saved"] < 1 for r in read_metrics(double) if "loss" in r)
    assert_same_training(single, double)


def test_ddp_with_padding_free_length_grouped_batches_trains_as_one_padded_process(tmp_path):
    """2 DDP ranks of 2 prompts, each packing its own half of the length-grouped global batch,
    against 1 process of 4 padded prompts in the same grouped order: the same losses, evaluation
    and final weights (the ranks' halves are disjoint and together the padded batch)."""
    common = ["--max-steps", "3", "--num-weak", "1", "--eval-fraction", "0.1", "--group-by-length", *ON_CPU]
    single, double = tmp_path / "single", tmp_path / "double"
    train_in_process(single, *common, "--batch-size", "4")
    torchrun_epa_train(double, *common, "--batch-size", "2", "--padding-free")
    assert train_losses(read_metrics(double)) == pytest.approx(train_losses(read_metrics(single)), rel=RTOL, abs=ATOL)
    evaluation = lambda out: [r[k] for r in read_metrics(out) if "eval/loss" in r  # noqa: E731
                              for k in ("eval/loss", "eval/logps/chosen", "eval/rewards/chosen")]
    assert evaluation(double) == pytest.approx(evaluation(single), rel=RTOL, abs=ATOL)
    assert_same_training(single, double)


def test_fsdp_over_two_processes_trains_as_one_and_resumes(tmp_path):
    """FSDP2 (fully_shard) over 2 processes, 2 prompts each, against 1 plain process with 4: the
    same losses and final weights (gathered from the shards); then a resume of the sharded run
    from its gathered checkpoint (final/ and the last step's checkpoint deleted as if it had died
    after checkpoint-2) ends the same."""
    common = ["--max-steps", "4", "--save-steps", "2", "--num-weak", "1", "--eval-fraction", "0", *ON_CPU]
    plain = train_in_process(tmp_path / "plain", *common, "--batch-size", "4")
    out = tmp_path / "fsdp"
    torchrun_epa_train(out, *common, "--batch-size", "2", "--fsdp")
    assert train_losses(read_metrics(out)) == pytest.approx(train_losses(plain), rel=RTOL, abs=ATOL)
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    assert_same_training(tmp_path / "plain", out)

    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-4")
    torchrun_epa_train(out, *common, "--batch-size", "2", "--fsdp", "--resume")
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert train_losses(read_metrics(out)) == pytest.approx(train_losses(plain), rel=RTOL, abs=ATOL)
    assert_same_training(tmp_path / "plain", out)


def test_a_finished_sharded_run_leaves_no_garbage_for_the_interpreters_exit(tmp_path, monkeypatch):
    """run() frees an FSDP run's reference cycles (the sharded modules, their meshes and the process
    group) itself, before it returns: freed by the interpreter's exit instead, a collective's thread
    may release them when it can no longer take the GIL (a gloo rank aborted so once in CI). The
    automatic collector is off, so only run() can have freed them."""
    import gc

    from torch.distributed.fsdp import FSDPModule

    monkeypatch.setenv("WORLD_SIZE", "1")  # one rank of its own (FSDP needs a process group)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    gc.collect()
    gc.disable()
    try:
        train_in_process(tmp_path / "run", "--max-steps", "1", "--num-weak", "1", "--eval-fraction", "0", *ON_CPU,
                         "--batch-size", "2", "--fsdp")
        assert not dist.is_initialized()
        assert not [o for o in gc.get_objects() if isinstance(o, FSDPModule)]
    finally:
        gc.enable()
