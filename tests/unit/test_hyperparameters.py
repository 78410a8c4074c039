import pytest

from shared.jobs.schemas import Hyperparameters
from shared.jobs.service import resolve_hyperparameters


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
    assert resolve_hyperparameters(Hyperparameters(), examples) == expected


def test_explicit_values_are_kept():
    given = Hyperparameters(n_epochs=2, batch_size=16, learning_rate_multiplier=0.5)
    assert resolve_hyperparameters(given, 500) == {"n_epochs": 2, "batch_size": 16, "learning_rate_multiplier": 0.5}
