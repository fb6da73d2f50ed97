"""EPATrainer under `accelerate launch` with FSDP2 (fsdp_version 2), two gloo processes on the CPU,
as a TRL user runs it: the same losses, gradient norms and final weights as one process with the
whole batch, and as TRL's DPOTrainer under the same config; a planted bug (one label dropped) makes
the comparison fail. The fused loss reads the lm_head inside the model's forward, where FSDP2 holds
it whole (epa_ext.causal_lm.through_model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import free_port
from numerics import ADAM_SLACK, assert_trl_parity

pytest.importorskip("trl")

STEPS, LR = 3, 1e-3
SCRIPT = textwrap.dedent('''
    """One training run: EPATrainer or DPOTrainer (argv[1]) on the tiny model in argv[2]; writes its
    losses, gradient norms and final weights (gathered from the shards) to argv[3]."""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    import epa_ext
    from epa_ext import IGNORE_INDEX
    from epa_ext.integrations.trl import EPAConfig, EPATrainer
    from test_trl import standard_rows
    which, model_dir, out = sys.argv[1:4]
    if os.environ.get("PLANTED_BUG"):  # the last answer token of the first row is not scored
        import epa_ext.preference.loss as integration
        original = integration.fused_linear_dpo_loss
        def dropped_label(hidden, weight, labels, ref, **kwargs):
            labels = labels.clone()
            labels[0, (labels[0] != IGNORE_INDEX).nonzero().max()] = IGNORE_INDEX
            return original(hidden, weight, labels, ref, **kwargs)
        integration.fused_linear_dpo_loss = dropped_label
    trainer_cls, config_cls = (DPOTrainer, DPOConfig) if which == "trl" else (EPATrainer, EPAConfig)
    args = config_cls(output_dir=out + "-run", per_device_train_batch_size=int(os.environ["BATCH"]),
                      max_steps={steps}, logging_steps=1, learning_rate={lr}, use_cpu=True, bf16=False,
                      report_to="none", save_strategy="no", disable_tqdm=True, max_length=64, seed=0)
    trainer = trainer_cls(model=model_dir, args=args, train_dataset=Dataset.from_list(standard_rows(16)),
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    weights = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.accelerator.is_main_process:
        log = [e for e in trainer.state.log_history if "loss" in e]
        json.dump([{{"loss": e["loss"], "grad_norm": e["grad_norm"]}} for e in log], open(out + ".json", "w"))
        torch.save({{k: v.detach().cpu() for k, v in weights.items()}}, out + ".pt")
    # Free the sharded model and then the process group while the interpreter is whole (as epa-train's
    # runtime.teardown does): left to the interpreter's exit, a gloo rank of this script aborted once
    # ("terminate called without an active exception", SIGABRT) after the run had finished.
    import gc
    del trainer, weights
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()
''').format(tests=str(Path(__file__).parent), steps=STEPS, lr=LR)
FSDP2 = textwrap.dedent("""
    compute_environment: LOCAL_MACHINE
    distributed_type: FSDP
    num_processes: 2
    num_machines: 1
    machine_rank: 0
    mixed_precision: 'no'
    use_cpu: true
    fsdp_config:
      fsdp_version: 2
      fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
      fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
      fsdp_reshard_after_forward: true
      fsdp_state_dict_type: FULL_STATE_DICT
      fsdp_cpu_ram_efficient_loading: false
""")


def run(tmp_path: Path, which: str, *, fsdp: bool, planted_bug: bool = False) -> tuple[list[dict], dict]:
    script, config = tmp_path / "train.py", tmp_path / "fsdp2.yaml"
    script.write_text(SCRIPT)
    config.write_text(FSDP2)
    out = tmp_path / f"{which}-{'fsdp' if fsdp else 'single'}{'-bug' if planted_bug else ''}"
    env = {**os.environ, "BATCH": "2" if fsdp else "4", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    if planted_bug:
        env["PLANTED_BUG"] = "1"
    launcher = ([str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(config),
                 "--main_process_port", str(free_port())] if fsdp else [sys.executable])
    result = subprocess.run([*launcher, str(script), which, str(tmp_path / "model"), str(out)], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(Path(f"{out}.json").read_text()), torch.load(f"{out}.pt")


def assert_same(ours, theirs, what: str) -> None:
    (log, weights), (their_log, their_weights) = ours, theirs
    assert len(log) == len(their_log) == STEPS
    for step, (entry, expected) in enumerate(zip(log, their_log), 1):
        for key in ("loss", "grad_norm"):
            assert_trl_parity(entry[key], expected[key], f"{what}: step {step} {key}")
    assert weights.keys() == their_weights.keys()
    for name, value in weights.items():
        assert_trl_parity(value, their_weights[name], f"{what}: final {name}", extra_atol=ADAM_SLACK * STEPS * LR)


@pytest.fixture
def tiny_model(tmp_path):
    from test_trl import make_tokenizer

    from epa_ext.train.modeling import build_tiny_model

    tokenizer = make_tokenizer()
    build_tiny_model(len(tokenizer), 32, 2, 128, seed=0).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_fsdp2_trains_as_one_process_and_as_dpo_trainer(tiny_model):
    sharded = run(tiny_model, "epa", fsdp=True)
    assert_same(sharded, run(tiny_model, "epa", fsdp=False), "FSDP2 (2 processes) vs 1 process")
    assert_same(sharded, run(tiny_model, "trl", fsdp=True), "EPATrainer vs DPOTrainer, both under FSDP2")
    with pytest.raises(AssertionError):  # the comparison sees a one-token bug
        assert_same(sharded, run(tiny_model, "epa", fsdp=False, planted_bug=True), "planted bug")


def test_sharded_setups_that_are_not_right_are_refused(tmp_path):
    """FSDP1 through the config; DeepSpeed (ZeRO-3 partitions the head) through the check the
    trainer also runs on accelerate's own config (transformers needs the deepspeed package to
    build a config that names it, which this machine lacks)."""
    from epa_ext.integrations.trl import EPAConfig
    from epa_ext.integrations.trl.config import check_sharding

    with pytest.raises(ValueError, match="FSDP version 1 is not supported by EPATrainer"):
        EPAConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", fsdp="full_shard",
                  fsdp_config={"fsdp_version": 1})
    with pytest.raises(ValueError, match="DeepSpeed is not supported by EPATrainer: ZeRO-3 partitions"):
        check_sharding(True, None)
    check_sharding(False, 2)  # FSDP2: supported
