"""How well the model predicts the labelled tokens: the masked loss training backpropagates and validation
reports, token accuracy, and the decisions taken on validation results (best adapter, early stopping)."""

import dataclasses
from collections.abc import Callable

import torch

from shared.datasets.tokenization import Encoded
from worker.training.data import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The summed next-token cross-entropy over the labelled positions (a tensor to backpropagate, zero with
    a gradient when none is labelled) and how many of them the argmax gets right."""
    target = labels[:, 1:].reshape(-1)
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    loss_sum = torch.nn.functional.cross_entropy(shifted.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        mask = target != IGNORE_INDEX
        correct = int((shifted.argmax(-1)[mask] == target[mask]).sum())
    return loss_sum, correct


def labelled_positions(labels: torch.Tensor) -> int:
    """Positions `token_loss_sum` counts: labelled ones, the first of each row aside (nothing predicts it)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = logits[:, :-1].argmax(dim=-1)
        target = labels[:, 1:]
        mask = target != IGNORE_INDEX
        return float((predicted[mask] == target[mask]).float().mean()) if mask.any() else 0.0


@torch.no_grad()
def validation_metrics(
    model, examples: list[Encoded], batch_size: int, collate: Callable[[list[Encoded]], dict[str, torch.Tensor]]
) -> dict[str, float]:
    """Mean loss and token accuracy per labelled token over the held-out examples."""
    model.eval()
    loss_sum, correct, tokens = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        inputs = collate(examples[start : start + batch_size])
        labels = inputs.pop("labels")
        batch_loss, batch_correct = token_loss_sum(model(**inputs, use_cache=False).logits, labels)
        loss_sum += float(batch_loss)
        correct += batch_correct
        tokens += labelled_positions(labels)
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
