import pytest

from shared.jobs.hyperparameters import resolve_hyperparameters
from shared.jobs.schemas import Hyperparameters


@pytest.mark.parametrize(
    "examples, expected",
    [
        (200, {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 5.0}),  # 75 steps: a short run
        (20, {"n_epochs": 10, "batch_size": 8, "learning_rate_multiplier": 5.0}),
        (3, {"n_epochs": 10, "batch_size": 3, "learning_rate_multiplier": 5.0}),
        (10_000, {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1.0}),  # 1250 steps
    ],
)
def test_auto_values_resolve_by_dataset_size(examples, expected):
    resolved = resolve_hyperparameters(Hyperparameters(), examples)
    assert {k: resolved[k] for k in expected} == expected
    assert resolved["learning_rate"] == pytest.approx(2e-4 * expected["learning_rate_multiplier"])


def test_explicit_values_are_kept():
    given = Hyperparameters(
        n_epochs=2,
        batch_size=16,
        learning_rate_multiplier=0.5,
        lr_scheduler="cosine",
        warmup_ratio=0.1,
        n_evals=3,
        early_stopping_patience=2,
    )
    resolved = resolve_hyperparameters(given, 500)
    assert resolved["learning_rate"] == pytest.approx(1e-4)
    assert (resolved["n_epochs"], resolved["batch_size"], resolved["lr_scheduler"]) == (2, 16, "cosine")
    assert (resolved["warmup_ratio"], resolved["n_evals"], resolved["early_stopping_patience"]) == (0.1, 3, 2)


def test_absolute_learning_rate_wins():
    assert resolve_hyperparameters(Hyperparameters(learning_rate=3e-5), 100)["learning_rate"] == 3e-5
