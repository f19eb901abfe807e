"""Health checks under the heaviest admitted load, and slow or silent connections (issue 19, item 4).

The figures against the 250 ms target come from benchmarks/robustness/ping_under_load.py (16 clients); here, a
shorter run on a shared CI machine asserts what the inline design failed by an order of magnitude (``/ping`` took
10 s and more) with room for the machine's noise: every ``/ping`` answered, p99 under 1 s.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from .helpers import Server, largest_admitted_png, launch, sample_image, wait_healthy

READ_TIMEOUT = 2.0
KEEPALIVE = 3


@pytest.fixture(scope="module")
def strict_server(model_dir: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``serve`` with two workers and short connection limits."""
    log_path = tmp_path_factory.mktemp("strict-log") / "serve.log"
    srv = launch(model_dir, log_path, cache_dir, {"SERVING_REQUEST_READ_TIMEOUT": str(READ_TIMEOUT),
                                                  "SERVING_KEEPALIVE_TIMEOUT": str(KEEPALIVE)})
    try:
        wait_healthy(srv)
        yield srv
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


def test_ping_answers_while_workers_decode_the_largest_images(strict_server: Server) -> None:
    heavy = largest_admitted_png()
    stop = threading.Event()
    statuses: list[int] = []
    pings: list[float] = []

    def post() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", strict_server.port, timeout=120)
        try:
            while not stop.is_set():
                conn.request("POST", "/invocations", body=heavy, headers={"Content-Type": "image/png"})
                resp = conn.getresponse()
                resp.read()
                statuses.append(resp.status)
        finally:
            conn.close()

    clients = [threading.Thread(target=post) for _ in range(8)]
    for t in clients:
        t.start()
    try:
        time.sleep(1.5)  # the workers are busy and requests are queued
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            status = strict_server.request("GET", "/ping", timeout=10)[0]
            pings.append(time.perf_counter() - t0)
            assert status == 200
            time.sleep(0.1)
    finally:
        stop.set()
        for t in clients:
            t.join(120)
    assert statuses and set(statuses) == {200}, statuses
    p99 = float(np.percentile(pings, 99))
    assert p99 < 1.0, f"/ping p99 {p99:.3f} s under load (max {max(pings):.3f} s, n={len(pings)})"


def _read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection; and when it closed (``limit`` if it did not)."""
    sock.settimeout(0.2)
    t0 = time.monotonic()
    data = b""
    while time.monotonic() - t0 < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - t0
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk
    return data, limit


@pytest.mark.parametrize("stage", ["request line", "headers", "body"])
def test_a_slow_sender_gets_408_and_is_closed(strict_server: Server, stage: str) -> None:
    request = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n\r\n"
               + b"\xff" * 5000)
    sent = {"request line": 10, "headers": 40, "body": len(request) - 4000}[stage]
    with socket.create_connection(("127.0.0.1", strict_server.port)) as sock:
        sock.sendall(request[:sent])
        stop = threading.Event()

        def trickle() -> None:  # one more byte every 0.3 s: never idle, never done
            for i in range(sent, sent + 30):
                if stop.wait(0.3):
                    return
                try:
                    sock.send(request[i:i + 1])
                except OSError:
                    return

        t = threading.Thread(target=trickle)
        t.start()
        try:
            data, closed_after = _read_until_closed(sock, READ_TIMEOUT + 6)
        finally:
            stop.set()
            t.join()
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert b'"error": "request_timeout"' in data
    assert READ_TIMEOUT - 0.5 < closed_after < READ_TIMEOUT + 3, closed_after


def test_many_slow_connections_are_all_closed_and_ping_still_answers(strict_server: Server) -> None:
    socks = [socket.create_connection(("127.0.0.1", strict_server.port)) for _ in range(60)]
    try:
        for s in socks:
            s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
        assert strict_server.request("GET", "/ping", timeout=5)[0] == 200
        time.sleep(READ_TIMEOUT + 2)
        closed = 0
        for s in socks:
            data, after = _read_until_closed(s, 1.0)
            closed += after < 1.0 and data.startswith(b"HTTP/1.1 408 ")
        assert closed == len(socks)
    finally:
        for s in socks:
            s.close()


def test_a_silent_connection_is_closed_after_the_keepalive_timeout(strict_server: Server) -> None:
    with socket.create_connection(("127.0.0.1", strict_server.port)) as sock:
        data, closed_after = _read_until_closed(sock, KEEPALIVE + 5)
    assert data == b"" and KEEPALIVE - 0.5 < closed_after < KEEPALIVE + 2, closed_after


def test_keep_alive_clients_are_unaffected(strict_server: Server) -> None:
    """A normal client reuses its connection across requests paced under the keep-alive timeout."""
    conn = http.client.HTTPConnection("127.0.0.1", strict_server.port, timeout=30)
    try:
        for _ in range(3):
            conn.request("POST", "/invocations", body=sample_image(), headers={"Content-Type": "image/jpeg"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            time.sleep(READ_TIMEOUT + 0.5)  # longer than the read limit: only a request's own arrival is timed
        assert conn.sock is not None  # the same connection throughout
    finally:
        conn.close()


def test_an_inference_id_longer_than_sagemaker_allows_is_refused(strict_server: Server) -> None:
    body = sample_image()
    for value, status in (("x" * 64, 200), ("x" * 65, 400), ("y" * 100_00, 400)):
        got, _, data = strict_server.request("POST", "/invocations", body,
                                             {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Inference-Id": value})
        assert got == status, data[:200]
        if status == 400:
            assert b"invalid_inference_id" in data and b"at most 64" in data
