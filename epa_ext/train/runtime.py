"""Where epa-train runs: one process, or one of WORLD_SIZE under torchrun (gloo on CPU, nccl on
GPU); the collectives the loop needs (every rank takes the same decisions); data parallelism
(DDP, or FSDP2's fully_shard) and gathering the full weights and optimizer state of a sharded
model for checkpoints."""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import TrainConfig
from ..causal_lm import unwrap


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """The process group (under torchrun) and the device of this rank."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda" if want_cuda else "cpu")
    rank = 0
    if world_size > 1 or cfg.fsdp:  # FSDP needs a process group even for one rank
        if want_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl" if want_cuda else "gloo")
        rank = dist.get_rank()
    return Runtime(rank, world_size, device)


def teardown(runtime: Runtime) -> None:
    """Frees the finished run's objects, then the process group, while the interpreter is whole.
    A sharded model sits in reference cycles (modules, device meshes, the group itself); left to
    the interpreter's exit, the group's threads release them while Python shuts down, where a
    thread cannot take the GIL any more (a gloo rank of a finished FSDP run aborted once that way
    in CI: "terminate called without an active exception")."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def autocast(cfg: TrainConfig, runtime: Runtime):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(runtime.device.type, dtype=dtype)


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """Whether flag holds on some rank (a collective: every rank calls it)."""
    value = torch.tensor([int(flag)], device=runtime.device)
    if runtime.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_finite(loss: torch.Tensor, runtime: Runtime) -> bool:
    """Whether the loss is finite on every rank."""
    return not any_rank(not bool(torch.isfinite(loss.detach()).item()), runtime)


def all_mean(values: dict[str, float], runtime: Runtime) -> dict[str, float]:
    """Mean of each value over the ranks."""
    if not runtime.distributed:
        return values
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(packed)
    return {k: v / runtime.world_size for k, v in zip(keys, packed.tolist())}


def distribute(loss_module: nn.Module, cfg: TrainConfig, runtime: Runtime) -> nn.Module:
    """The module the step calls: loss_module itself, sharded in place by fully_shard (--fsdp:
    each decoder layer, then the rest), or wrapped in DDP under torchrun."""
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in unwrap(loss_module.policy).base_model.layers:
            fully_shard(layer)
        fully_shard(loss_module)
        return loss_module
    if runtime.distributed:
        return nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    return loss_module


def no_sync(model: nn.Module, sync: bool):
    """DDP's no_sync on micro-steps that only accumulate (FSDP2 and one process: nothing)."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def full_weights(cfg: TrainConfig, loss_module: nn.Module) -> dict | None:
    """With FSDP the parameters are shards: gather the policy's full weights (a collective: every
    rank calls it) on the CPU of rank 0, a tied weight once (as save_pretrained writes it). None
    otherwise, and save_pretrained reads the model."""
    if not cfg.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(loss_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first_names = {name for name, _ in loss_module.named_parameters()} | {name for name, _ in loss_module.named_buffers()}
    return {k.removeprefix("policy."): v for k, v in state.items() if k in first_names}


def optimizer_state(cfg: TrainConfig, loss_module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state, full (gathered, a collective) under FSDP."""
    if not cfg.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(loss_module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(cfg: TrainConfig, loss_module: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict) -> None:
    if not cfg.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(loss_module, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
