"""Sharding models across processes with FSDP2 (``torch.distributed.fsdp.fully_shard``).

The units a model is split into, and what each process keeps between uses:

- the **student**: each transformer block is one FSDP unit; the trainable module around it (the student's
  embeddings, final norm and output layer, plus the objective's heads) is the root unit. Parameters,
  gradients and AdamW state of every unit are split evenly across processes (dim-0 shards, ``DTensor``);
  a unit's parameters are all-gathered just before it runs and freed after its forward (blocks) or after the
  backward (root), and its gradients are reduce-scattered (averaged) in the backward. The root stays
  gathered from the forward to the backward, so a term may read the student's output-layer weight
  ``[V, D]`` whole (the fused linear-divergence op does).
- each **live teacher**: each transformer block is its own FSDP unit, gathered while it runs and freed right
  after (``reshard_after_forward=True``); with ``offload`` the shards live in CPU memory between uses. The
  rest of the teacher (embeddings, final norm, output layer) is replicated on the device: it is small next
  to the blocks, and the fused op reads the teacher's output-layer weight after the teacher's forward, while
  the student's backward runs.

Every process must run every sharded forward (the gathers are collectives): a teacher or a student runs on
all processes with the same number of calls, never on one process alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from distillkit.models import layer_stack_prefix

__all__ = [
    "data_parallel_mesh",
    "gradient_norm",
    "mixed_precision",
    "per_process_bytes",
    "shard_teacher",
    "shard_trainable",
    "transformer_blocks",
]


def data_parallel_mesh(device: torch.device) -> DeviceMesh:
    """The 1-D mesh of every process; a single process without ``torchrun`` gets a group of its own.

    The processes' group is the one ``accelerate`` starts under ``torchrun`` (gloo on CPU, NCCL on CUDA).
    """
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def mixed_precision(bf16: bool, cast_inputs: bool = True) -> MixedPrecisionPolicy:
    """The FSDP mixed-precision policy of ``train.precision``: bf16 gathers and compute, fp32 gradients."""
    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=cast_inputs
    )


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (its module list of ``num_hidden_layers`` layers).

    Raises:
        ConfigError: If the model has no such list.

    """
    return list(model.get_submodule(layer_stack_prefix(model)[:-1]))


def shard_trainable(
    trainable: nn.Module, student: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy
) -> None:
    """Shards the student's blocks one unit each and ``trainable`` (student + objective heads) as the root.

    Args:
        trainable: The module the optimizer trains; its forward runs the student and the objective.
        student: The student inside ``trainable``.
        mesh: The processes to shard over.
        policy: The mixed-precision policy.

    """
    for block in transformer_blocks(student):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    root_policy = MixedPrecisionPolicy(
        param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype, cast_forward_inputs=False
    )  # the root's inputs are the batch and the teachers' taps, which stay as they are
    fully_shard(trainable, mesh=mesh, mp_policy=root_policy)


def shard_teacher(
    teacher: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy, offload: bool, device: torch.device
) -> nn.Module:
    """Shards a frozen teacher's blocks, each a unit freed after its forward; the rest goes to ``device``.

    Args:
        teacher: A frozen model (eval mode, no gradients).
        mesh: The processes to shard over.
        policy: The mixed-precision policy (its gathers; a teacher has no gradients).
        offload: Keep the blocks' shards in CPU memory between uses.
        device: Where the replicated rest (embeddings, final norm, output layer) lives.

    Returns:
        ``teacher``, sharded in place (a teacher already sharded is returned as it is).

    """
    blocks = transformer_blocks(teacher)
    if isinstance(blocks[0], FSDPModule):
        return teacher
    inside = {id(module) for block in blocks for module in block.modules()}
    _move_states((m for m in teacher.modules() if id(m) not in inside), device)
    placement: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    )
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=policy, offload_policy=placement)
    return teacher


def _move_states(modules: Iterable[nn.Module], device: torch.device) -> None:
    """Moves the modules' own parameters (in place, so tied weights stay tied) and buffers to ``device``."""
    for module in modules:
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))


def gradient_norm(params: Iterable[nn.Parameter], max_norm: float | None) -> float:
    """Clips the gradients of sharded (``DTensor``) parameters to ``max_norm`` and returns their global norm.

    The norm is that of the whole, unsharded gradient: each process's shard norm, combined across processes.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def per_process_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this process holds of ``tensors``: a sharded tensor's own shard, a plain tensor whole."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if id(tensor) in seen:  # tied weights count once
            continue
        seen.add(id(tensor))
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total
