"""Sixteen concurrent clients: no errors, the same answer for the same image whichever worker serves it."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from .helpers import SAMPLE_IMAGES, Server, encode

CLIENTS = 16
REQUESTS_PER_CLIENT = 6


def test_sixteen_concurrent_clients(server: Server) -> None:
    paths = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:4]
    jpegs = [p.read_bytes() for p in paths]
    pngs = [encode(Image.open(p), "PNG") for p in paths]
    bodies = []  # (image index, body, content type): every client mixes JPEG, PNG and JSON
    for i in range(CLIENTS * REQUESTS_PER_CLIENT):
        k = i % len(paths)
        kind = i % 3
        if kind == 0:
            bodies.append((k, jpegs[k], "image/jpeg"))
        elif kind == 1:
            bodies.append((k, pngs[k], "image/png"))
        else:
            doc = {"instances": [{"b64": base64.b64encode(jpegs[k]).decode()}]}
            bodies.append((k, json.dumps(doc).encode(), "application/json"))

    def call(item: tuple[int, bytes, str]) -> tuple[int, int, dict[str, float]]:
        k, body, ctype = item
        status, answer = server.invoke(body, ctype)
        return k, status, answer["predictions"][0]["probabilities"] if status == 200 else answer

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(call, bodies))
    errors = [r for r in results if r[1] != 200]
    assert not errors, errors[:3]
    by_image: dict[int, list[dict[str, float]]] = {}
    for k, _, probs in results:
        by_image.setdefault(k, []).append(probs)
    for k, answers in by_image.items():
        for probs in answers:  # PNG and JPEG carry the same pixels: equal up to the 6 significant digits sent
            for c, v in answers[0].items():
                assert abs(probs[c] - v) < 1e-5, (k, c)
    assert server.request("GET", "/ping")[0] == 200
