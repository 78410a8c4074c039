"""How well the model predicts the labelled tokens: the masked loss training backpropagates and validation
reports, token accuracy, and the decisions taken on validation results (best adapter, early stopping).

The LM head runs only where a label is. Its 49k-wide logits at every position of a batch are most of a small
model's training memory (and a good part of its time), while only the assistant's tokens are trained: the
decoder runs as usual, a pre-hook on the output layer keeps the hidden states whose next token is labelled, and
the cross-entropy and accuracy are taken over those rows alone. The hook sits inside the model's own forward,
so PEFT's wrapping, tied embeddings and DeepSpeed's parameter gathering (ZeRO-3) all see an ordinary call."""

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from shared.datasets.tokenization import Encoded
from worker.training.data import IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class LabelledPositions:
    """The positions whose next token is labelled, flat over (rows × width), and those next tokens."""

    flat: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def of(cls, labels: torch.Tensor) -> "LabelledPositions":
        following = labels[:, 1:]
        rows, columns = (following != IGNORE_INDEX).nonzero(as_tuple=True)
        return cls(rows * labels.shape[1] + columns, following[rows, columns])

    def __len__(self) -> int:
        return int(self.flat.numel())


@contextmanager
def head_only_at(model, positions: torch.Tensor) -> Iterator[None]:
    """While open, the model's output layer sees the hidden states at `positions` only, as one row."""

    def keep_positions(_module, args):
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions).unsqueeze(0), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(keep_positions)
    try:
        yield
    finally:
        handle.remove()


def labelled_logits(model, inputs: dict[str, torch.Tensor], forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the labelled positions, their targets): the model's forward with the head only where needed.
    `inputs` carry labels; `forward` runs the model when something wraps it (DeepSpeed's engine)."""
    inputs = dict(inputs)
    positions = LabelledPositions.of(inputs.pop("labels"))
    with head_only_at(model, positions.flat):
        logits = (forward or model)(**inputs, use_cache=False).logits  # a cache would defeat packing's block mask
    return logits.reshape(-1, logits.shape[-1]), positions.targets


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy of labelled logits against their targets (a tensor to backpropagate, zero with a
    gradient when there are none) and how many of them the argmax gets right."""
    loss_sum = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    with torch.no_grad():
        correct = int((logits.argmax(-1) == targets).sum())
    return loss_sum, correct


def labelled_positions(labels: torch.Tensor) -> int:
    """Positions `token_loss_sum` counts: labelled ones, the first of each row aside (nothing predicts it)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def validation_metrics(
    model, examples: list[Encoded], batch_size: int, collate: Callable[[list[Encoded]], dict[str, torch.Tensor]]
) -> dict[str, float]:
    """Mean loss and token accuracy per labelled token over the held-out examples."""
    model.eval()
    loss_sum, correct, tokens = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        logits, targets = labelled_logits(model, collate(examples[start : start + batch_size]))
        batch_loss, batch_correct = token_loss_sum(logits, targets)
        loss_sum += float(batch_loss)
        correct += batch_correct
        tokens += len(targets)
    return {"valid_loss": loss_sum / max(tokens, 1), "valid_mean_token_accuracy": correct / max(tokens, 1)}


@dataclasses.dataclass
class BestValidation:
    """The best validation so far and how many evaluations since have not beaten it; a resume restores both."""

    best: dict | None = None
    evals_without_improvement: int = 0

    def record(self, step: int, metrics: dict[str, float]) -> bool:
        """Takes in one evaluation; true when it is the best so far (its adapter is then worth keeping)."""
        if self.best is None or metrics["valid_loss"] < self.best["valid_loss"]:
            self.best = {"step": step, **metrics}
            self.evals_without_improvement = 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def best_step(self) -> int | None:
        return None if self.best is None else self.best["step"]

    def patience_exhausted(self, patience: int | None) -> bool:
        return bool(patience) and self.evals_without_improvement >= (patience or 0)
