"""OpenAI's list envelope, typed by what it lists. Routers fetch `limit + 1` rows: the one past the limit
only says whether there are more."""

from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Generic, Literal, Self, TypeVar

from pydantic import BaseModel

T = TypeVar("T")
Row = TypeVar("Row")

_id = attrgetter("id")


class Listing(BaseModel, Generic[T]):
    """A complete list: `{"object": "list", "data": [...]}`."""

    object: Literal["list"] = "list"
    data: list[T]


class Page(Listing[T], Generic[T]):
    """One page of a longer list. first_id and last_id are in every page's JSON, null unless set."""

    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, fetched: Sequence[Row], limit: int, shape: Callable[[Row], T]) -> Self:
        return cls(data=[shape(row) for row in fetched[:limit]], has_more=len(fetched) > limit)

    @classmethod
    def whole(cls, items: Sequence[T]) -> Self:
        return cls(data=list(items), has_more=False)

    def with_ids(self) -> Self:
        """OpenAI's file and checkpoint lists carry the first and last item's ids; its job and event lists do not."""
        if self.data:
            self.first_id, self.last_id = _id(self.data[0]), _id(self.data[-1])
        return self
