"""What the recipe reports to the worker, one model per kind, told apart by the `event` field. Torch-free: the
recipe validates each report before writing it, the worker parses every report line into one of these."""

from typing import Annotated, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class MetricsEvent(BaseModel):
    """One step's metrics (`Reporter.log`). Whatever else the recipe measured rides along as extra fields."""

    model_config = ConfigDict(extra="allow")

    event: Literal["metrics"] = "metrics"
    step: int
    total_steps: int

    def row(self) -> dict:
        """The step's metrics as the worker stores them (DB, resume state, results file)."""
        return self.model_dump(exclude={"event"})


class SavedStateEvent(BaseModel):
    """The whole training state saved in a folder: a later attempt can continue from `step`."""

    step: int
    path: str
    metrics: dict


class CheckpointEvent(SavedStateEvent):
    event: Literal["checkpoint"] = "checkpoint"


class PausedEvent(SavedStateEvent):
    """Saved after a pause (or a worker's shutdown); the recipe exits next."""

    event: Literal["paused"] = "paused"


class MessageEvent(BaseModel):
    """A line for the job's events, at OpenAI's event levels ("warn": the job goes on, but read this)."""

    event: Literal["message"] = "message"
    message: str
    level: Literal["info", "warn"] = "info"


class DoneEvent(BaseModel):
    event: Literal["done"] = "done"
    adapter: str
    trained_tokens: int
    metrics: dict
    evaluation: str | None = None  # the path of the base-vs-tuned evaluation (`comparison.EVALUATION_FILE`)


class ErrorEvent(BaseModel):
    """Why the recipe failed. `retryable`: the node was at fault (a full disk), not the job."""

    event: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None
    retryable: bool = False
    rank: int | None = None
    traceback: str | None = None

    def report(self) -> dict:
        """As the worker weighs failures: the fields the recipe sent, without the kind."""
        return self.model_dump(exclude={"event"}, exclude_unset=True)


RecipeEvent: TypeAlias = Annotated[
    MetricsEvent | CheckpointEvent | PausedEvent | MessageEvent | DoneEvent | ErrorEvent,
    Field(discriminator="event"),
]
RECIPE_EVENT: TypeAdapter[RecipeEvent] = TypeAdapter(RecipeEvent)
