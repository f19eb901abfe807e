"""What AWS answered: the code and message of a botocore ``ClientError`` (match on the code AWS documents)."""

from __future__ import annotations

from botocore.exceptions import ClientError


def error_code(err: ClientError) -> str:
    """The error code of a botocore ClientError."""
    return str(err.response.get("Error", {}).get("Code", ""))


def error_message(err: ClientError) -> str:
    """The error message of a botocore ClientError."""
    return str(err.response.get("Error", {}).get("Message", ""))
