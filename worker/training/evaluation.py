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


# Labelled rows that go through the output layer at once: their logits (49k wide for SmolLM2, bf16 and a float32
# copy) are then ~40 MB, where 512 rows' would be ~150 MB and more memory the allocator keeps after each step.
HEAD_CHUNK_ROWS = 128


def labelled_loss_sum(model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """`token_loss_sum(*labelled_logits(model, inputs))`, the labelled logits never whole: when the output layer is
    a frozen linear one (LoRA trains no head), its rows go through it `HEAD_CHUNK_ROWS` at a time, and each chunk's
    gradient for the hidden states is taken right there (`ChunkedHeadLoss`), so that no logits are kept for the
    backward pass. A head that trains, or whose weights DeepSpeed partitions, takes the whole-logits path."""
    head = model.get_output_embeddings()
    if not frozen_linear(head):
        return token_loss_sum(*labelled_logits(model, inputs))
    inputs = dict(inputs)
    positions = LabelledPositions.of(inputs.pop("labels"))
    with hidden_states_at(model, positions.flat) as kept:
        model(**inputs, use_cache=False)
    loss_sum, correct = ChunkedHeadLoss.apply(kept[0], head.weight, positions.targets)
    return loss_sum, int(correct)


def frozen_linear(head) -> bool:
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and not hasattr(head.weight, "ds_id")  # a ZeRO-3 parameter: gathered only inside its module's forward
    )


@contextmanager
def hidden_states_at(model, positions: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """While open, the output layer gets no rows; the hidden states at `positions` land in the list yielded."""
    kept: list[torch.Tensor] = []

    def keep_positions(_module, args):
        hidden = args[0]
        kept.append(hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions))
        return (hidden[:, :0], *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(keep_positions)
    try:
        yield kept
    finally:
        handle.remove()


class ChunkedHeadLoss(torch.autograd.Function):
    """(summed cross-entropy, correct argmaxes) of `hidden @ weight.T` against `targets`, chunk by chunk. The
    weight is frozen, so the only gradient is the hidden states': (softmax - one-hot) @ weight, taken in the
    forward while a chunk's logits exist and scaled by the loss's gradient in the backward. The logits are computed
    in the hidden states' dtype and their softmax in float32, as `token_loss_sum` does."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):  # type: ignore[override]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], HEAD_CHUNK_ROWS):
            rows = slice(start, start + HEAD_CHUNK_ROWS)
            logits, target = torch.nn.functional.linear(hidden[rows], weight).float(), targets[rows]
            log_norm = logits.logsumexp(-1)
            loss_sum += (log_norm - logits.gather(1, target.unsqueeze(1)).squeeze(1)).sum()
            correct += (logits.argmax(-1) == target).sum()
            if grad is not None:
                probabilities = logits.sub_(log_norm.unsqueeze(1)).exp_()
                probabilities[torch.arange(len(target), device=target.device), target] -= 1
                grad[rows] = probabilities.to(hidden.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None


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
        batch = collate(examples[start : start + batch_size])
        batch_loss, batch_correct = labelled_loss_sum(model, batch)
        loss_sum += float(batch_loss)
        correct += batch_correct
        tokens += labelled_positions(batch["labels"])
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
