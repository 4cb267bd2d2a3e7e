"""The data-parallel strategies the trainer runs under (trainer.strategy): none (the model itself), ddp (a
DistributedDataParallel wrapper) or fsdp2 (the model sharded in place, block by block, from rank 0's weights),
and what each computes in (for the cache key)."""
from __future__ import annotations

import torch

from hps_exp.config import RuntimeConfig
from hps_exp.distributed import DistributedError, World

STRATEGIES = ("none", "ddp", "fsdp2")

def decoder_block_classes(model: torch.nn.Module) -> tuple[type[torch.nn.Module], ...]:
    """The model's transformer block classes, from HF's `_no_split_modules` (e.g. GPT2Block, LlamaDecoderLayer)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    if not classes:
        raise ValueError(f"trainer.strategy=fsdp2: {type(model).__name__} declares no _no_split_modules "
                         f"(its decoder block class); cannot shard it block by block")
    return classes


def compute_numerics(strategy: str, distributed: bool, autocast: torch.dtype | None) -> str:
    """What the forward and backward really compute in, for the cache key: under fsdp2 with several processes the
    parameters themselves are cast to the autocast dtype (MixedPrecisionPolicy: every op in bf16), elsewhere
    autocast picks bf16 per op (norms, softmax, losses stay fp32). fp32 (trainer.precision=fp32, or auto on CPU)
    is fp32 under every strategy: fsdp2 then keeps fp32 parameters."""
    if autocast is None:
        return "fp32"
    name = str(autocast).removeprefix("torch.")
    if strategy == "fsdp2" and distributed:
        return f"{name} parameters (fsdp2)"
    return f"{name} autocast"


def wrap(model: torch.nn.Module, cfg: RuntimeConfig, world: World,
         param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The module the step function calls: the model itself (none / one process), a DDP wrapper, or the
    model sharded in place by FSDP2 (`shard_from_rank0`). The model is on `world.device` except under FSDP2,
    which moves only each rank's shards there."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"trainer.strategy={cfg.strategy!r} is not allowed; choose one of {', '.join(STRATEGIES)}")
    if cfg.activation_checkpointing:
        from hps_exp import models

        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"trainer.activation_checkpointing=true: {type(model).__name__} does not support it")
        # Non-reentrant checkpointing: works under DDP and FSDP2 and with frozen (LoRA) inputs.
        models.enable_activation_checkpointing(model)
    if not world.distributed or cfg.strategy == "none":
        if world.distributed:
            raise DistributedError(f"{world.world_size} processes were launched but trainer.strategy=none; set "
                                   f"trainer.strategy=ddp or fsdp2")
        return model.to(world.device)
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [world.device.index] if world.device.type == "cuda" else None
        # gradients as views into the all-reduce buckets: no second gradient copy
        return DDP(model.to(world.device), device_ids=ids, gradient_as_bucket_view=True)
    return shard_from_rank0(model, world, param_dtype)


def shard_from_rank0(model: torch.nn.Module, world: World, param_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2: shard `model` in place block by block (each decoder block, then the root), each rank keeping only
    its shards on its device, with rank 0's weights broadcast to every rank (as DDP does at construction).
    Only rank 0 needs real weights: the other ranks may pass the model built on the meta device
    (models.empty_twin), so no rank but 0 ever holds the whole model, and rank 0 holds it in host memory only.
    `param_dtype` (the autocast dtype, None for fp32): the dtype parameters are gathered and computed in;
    gradients are reduced in fp32."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full = {k: v.detach() for k, v in model.state_dict().items()} if world.is_main else {}
    # buffers outside the state dict (e.g. rotary inv_freq): small, broadcast as objects below
    extra = ({name: b.detach().cpu() for name, b in model.named_buffers() if name not in full}
             if world.is_main else None)
    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype is not None
          else MixedPrecisionPolicy())
    blocks = decoder_block_classes(model)
    for m in list(model.modules()):
        if isinstance(m, blocks):
            fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_meta for t in tensors):
        model.to_empty(device=world.device)   # allocates this rank's shards only
    else:
        model.to(world.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for name, value in world.broadcast_object(extra).items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value.to(world.device)
    return model
