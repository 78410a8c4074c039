"""The whole training state in a folder, so that a later run continues exactly where this one stood.

A folder holds `adapter/` (the LoRA weights, loadable on their own), `best/` (the best adapter so far, when
one is kept), `state.pt` (the loop's position, RESUMED_FIELDS) and what the engine keeps beside it: the
optimizer, the schedule and each rank's RNG (see `TrainingEngine.save`)."""

import dataclasses
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from worker.training import distributed

if TYPE_CHECKING:  # the engines write their part of the folder with the helpers below
    from worker.training.engine import TrainingEngine

STATE_FILE = "state.pt"
ADAPTER = "adapter"
BEST = "best"

RESUMED_FIELDS = (
    "global_step",
    "trained_tokens",
    "epoch",
    "batch_index",
    "best",
    "evals_without_improvement",
    "initial",
    "elapsed_before",
)


@dataclasses.dataclass
class TrainingProgress:
    """Where the loop stands in the run (the rest of RESUMED_FIELDS is `evaluation.BestValidation`)."""

    global_step: int = 0
    trained_tokens: int = 0
    epoch: int = 1
    batch_index: int = 0  # the next batch of `epoch`: a resume starts there
    initial: dict = dataclasses.field(default_factory=dict)  # the base model's validation, before any step
    elapsed_before: float = 0.0  # training seconds before this process started


def checked_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """RESUMED_FIELDS out of `fields`; a missing one fails here rather than as a run that resumes elsewhere."""
    missing = [name for name in RESUMED_FIELDS if name not in fields]
    if missing:
        raise ValueError(f"the training state lacks {', '.join(missing)}: it cannot resume")
    return {name: fields[name] for name in RESUMED_FIELDS}


# What `rng_state` saves: torch's CPU generator, Python's, and on CUDA every device's generator.
RNG_KEYS = ("torch_rng", "python_rng", "cuda_rng")


def rng_state() -> dict[str, Any]:
    """This rank's random generators. Dropout draws from torch's generator of the device it runs on (on a GPU,
    that device's own), so a resume must continue each stream where it stood."""
    state = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(rng: dict[str, Any]) -> None:
    """Puts back what `rng_state` saved. A CUDA state saved on another number of devices is restored for the
    devices both runs have; a state saved without CUDA leaves the CUDA generators as seeded."""
    torch.set_rng_state(rng["torch_rng"])
    random.setstate(rng["python_rng"])
    saved = rng.get("cuda_rng")
    if saved and torch.cuda.is_available():
        for index, state in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


def rng_fields(state: dict[str, Any]) -> dict[str, Any]:
    """The RNG entries of a state read back, taken out of it."""
    return {key: state.pop(key) for key in RNG_KEYS if key in state}


def rank_rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng-rank-{rank}.pt"


def read_state_file(folder: Path) -> dict[str, Any]:
    # weights_only: tensors and plain values, no pickled code, even from our own verified checkpoint
    return torch.load(folder / STATE_FILE, weights_only=True)


def clear_stale_folder(path: Path, engine: "TrainingEngine") -> None:
    """The ranks share the folder: none writes into it before a stale one is gone (or it could delete the
    files another rank has just written), so one rank deletes and all meet at a barrier."""
    if engine.writes and path.exists():
        shutil.rmtree(path)
    distributed.barrier()


def save_state(folder: Path, engine: "TrainingEngine", fields: dict[str, Any], best: Path) -> None:
    """Everything needed to continue exactly here; `best` is the run's best-adapter folder."""
    fields = checked_fields(fields)
    engine.save_adapter(folder / ADAPTER)
    if engine.writes and best.exists():
        shutil.copytree(best, folder / BEST, dirs_exist_ok=True)
    engine.save(folder, fields, rng_state())


def load_state(folder: Path, engine: "TrainingEngine", best: Path) -> dict[str, Any]:
    """Restores the engine and the RNG from `folder`, puts its best adapter back at `best`; returns the
    loop's fields."""
    fields, rng = engine.load(folder)
    fields = checked_fields(fields)
    restore_rng(rng)
    if engine.writes and (folder / BEST).exists():
        shutil.copytree(folder / BEST, best, dirs_exist_ok=True)
    distributed.barrier()
    return fields
