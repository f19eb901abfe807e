"""tools/cli.py's one-line messages for the errors botocore raises before AWS answers."""

from __future__ import annotations

import pytest
from botocore.exceptions import EndpointConnectionError

from tools.cli import aws_message


def test_an_unreachable_local_endpoint_says_how_to_start_local_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
    message = aws_message(EndpointConnectionError(endpoint_url="http://127.0.0.1:4566/"))
    assert "AWS_ENDPOINT_URL" in message and "make up" in message and "unset AWS_ENDPOINT_URL" in message
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert aws_message(EndpointConnectionError(endpoint_url="https://s3.eu-west-1.amazonaws.com/")).startswith(
        "cannot reach AWS")
