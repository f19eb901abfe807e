"""Reading a handler's event into its pydantic model."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lesion_common.errors import InvalidRequestError

ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_event(model: type[ModelT], event: Any, what: str) -> ModelT:
    """``model`` validated from ``event``; a mismatch is the error the state machines catch by name.

    Parameters
    ----------
    model : type[BaseModel]
        The handler's input model.
    event : Any
        What Lambda passed in.
    what : str
        How the message names the event, e.g. ``"invalid gate request"``; the validation errors follow it.

    Raises
    ------
    InvalidRequestError
        ``event`` does not match ``model`` (the pydantic error is its cause).
    """
    try:
        return model.model_validate(event)
    except ValidationError as err:
        raise InvalidRequestError(f"{what}: {err}") from err
