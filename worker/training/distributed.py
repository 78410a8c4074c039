"""One job on several devices: `torchrun --nproc_per_node k` starts k copies of the recipe, which train one
model together through DeepSpeed (ZeRO-2 by default for QLoRA, ZeRO-3 on request). Each rank takes its share
of every global batch, so the effective batch is the job's `batch_size` whatever k is; rank 0 reports and
writes the adapter. On CPU-only nodes the same path runs with DS_ACCELERATOR=cpu and gloo."""

import contextlib
import os

import torch

from worker.training.model import compute_dtype


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return world_size() > 1


def init() -> None:
    import deepspeed

    _skip_shared_memory_op()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _skip_shared_memory_op() -> None:
    """DeepSpeed's communication backend builds its shared-memory all-reduce op when it starts on a CPU node:
    a C++ extension compiled on first use (about a minute, again for every new install), after probing every
    op builder with compiler runs at every launch. That op serves only `inference_all_reduce`, never a ZeRO
    training step, so it is marked unavailable before the backend starts (`deepspeed.ops` keeps one dict of
    compatible ops, which its backend reads for that op alone)."""
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):  # not probed yet: no probe needed
        deepspeed.ops.__compatible_ops__ = {}
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ZeRO-3 keeps parameters smaller than this whole on every rank (DeepSpeed's default: 100,000 elements, so
# the LoRA matrices of a small base are never partitioned; those of a 7B base at r=64 are).
PERSISTENCE_THRESHOLD_ENV = "TUNEQUEUE_ZERO3_PERSISTENCE_THRESHOLD"


def config(stage: int, micro_batch: int, max_grad_norm: float) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3 and os.environ.get(PERSISTENCE_THRESHOLD_ENV):
        zero["stage3_param_persistence_threshold"] = int(os.environ[PERSISTENCE_THRESHOLD_ENV])
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": compute_dtype() == torch.bfloat16},  # else float32, like the model
        "steps_per_print": 10**9,  # the recipe reports; DeepSpeed stays quiet
    }


def wrap(model, optimizer, scheduler, trainable, stage: int, micro_batch: int, max_grad_norm: float):
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=trainable,
        config=config(stage, micro_batch, max_grad_norm),
    )
    return engine, optimizer, scheduler


def shard(batch: list) -> list:
    """This rank's share of a global batch; empty when the batch holds fewer examples than ranks (the last
    batch of an epoch can)."""
    return batch[rank() :: world_size()]


def _collective_device() -> torch.device:
    """NCCL reduces tensors on the rank's GPU; gloo on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Each value summed over the ranks (one collective for all of them)."""
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(tensor)
    return tuple(float(v) for v in tensor.tolist())


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag is true on every rank if it is true on one: decisions that make every rank save (a pause, a
    checkpoint on a timer) are taken together, at the same step, or the collective save would hang."""
    if not active():
        return flags
    tensor = torch.tensor([float(f) for f in flags], device=_collective_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tuple(bool(v) for v in tensor.tolist())


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def close() -> None:
    """Every rank arrives, then the process group is taken down in order: a rank that exits while another
    still holds the group can make that one fail at its exit, and the run with it."""
    if active() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def full_parameters(params, stage: int):
    """Under ZeRO-3 the LoRA weights are partitioned across ranks: gather them to save the adapter."""
    if active() and stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0):
            yield
    else:
        yield


class SilentReporter:
    """Ranks other than 0 train but do not report."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def event(self, kind: str, **fields) -> None:
        pass
