"""Helpers for the inference tests: start ``serve`` as SageMaker does, talk HTTP to it, make odd images."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SAMPLE_IMAGES = REPO / "data" / "sample" / "images"
SHARED = REPO.parent / "shared" / "data"
NEGATIVES = SHARED / "negatives"
HAM_IMAGES = SHARED / "ham10000" / "images"


def free_port() -> int:
    """An unused port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running ``serve`` process."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """Its combined output so far."""
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None,
                timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def invoke(self, body: bytes, content_type: str | None = "image/jpeg", accept: str | None = None,
               ) -> tuple[int, dict[str, Any]]:
        """POST /invocations; returns the status and the parsed JSON body."""
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if accept is not None:
            headers["Accept"] = accept
        status, resp_headers, data = self.request("POST", "/invocations", body, headers)
        assert resp_headers.get("content-type") == "application/json", (status, resp_headers, data[:200])
        return status, json.loads(data)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return int(self.process.returncode)


def server_env(model_dir: Path, port: int, cache_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment SageMaker would give the container, pointed at 127.0.0.1 and a test model directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "SAGEMAKER_", "CAPTURE_", "MODEL_"))}
    env.update({
        "SM_MODEL_DIR": str(model_dir),
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "SERVING_BIND_HOST": "127.0.0.1",
        "SERVING_CACHE_DIR": str(cache_dir),
        "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
        # The image's PYTHONPATH (inference_image/Dockerfile).
        "PYTHONPATH": os.pathsep.join(str(p) for p in (REPO, REPO / "layers" / "common", REPO / "layers" / "imaging")),
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    env.update(extra or {})
    return env


def launch(model_dir: Path, log_path: Path, cache_dir: Path, extra_env: Mapping[str, str] | None = None) -> Server:
    """Start ``python -m inference_image.serve serve`` (the image's entry point) without waiting."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inference_image.serve", "serve"], cwd=REPO,
            env=server_env(model_dir, port, cache_dir, extra_env), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(port, proc, log_path)


def wait_healthy(server: Server, timeout: float = 120.0) -> None:
    """Poll /ping until 200; fails with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"server exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            if server.request("GET", "/ping", timeout=2.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"/ping not 200 after {timeout} s:\n{server.log()[-4000:]}")


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    """Encode a PIL image."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def sample_image(name: str = "ISIC_0024323.jpg") -> bytes:
    """Bytes of one bundled HAM10000 image."""
    return (SAMPLE_IMAGES / name).read_bytes()


def odd_variants(src: bytes) -> dict[str, tuple[bytes, str]]:
    """Valid but unusual encodings of one image: ``name -> (bytes, the conversion the server must report)``."""
    rgb = Image.open(io.BytesIO(src)).convert("RGB")
    big = rgb.resize((rgb.width * 3, rgb.height * 3))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    grey16 = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    return {
        "exif_rotated": (encode(big, "JPEG", exif=exif.tobytes()), "exif_orientation_6"),
        "cmyk": (encode(rgb.convert("CMYK"), "JPEG"), "CMYK->RGB"),
        "rgba": (encode(rgb.convert("RGBA"), "PNG"), "RGBA->RGB"),
        "palette": (encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "P->RGB"),
        "grey": (encode(rgb.convert("L"), "PNG"), "L->RGB"),
        "grey16": (encode(grey16, "PNG"), "I;16->RGB"),
        "webp": (encode(rgb, "WEBP", lossless=True), ""),
    }


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels but has no pixel data: a decompression-bomb probe."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def flip_weight_bytes(model_ts: Path, every: int = 7, mask: int = 0x20) -> str:
    """Damage the largest weight tensor inside a TorchScript archive in place, as a bad disk or a careless edit would:
    one exponent bit of every ``every``-th float32 flipped. The zip's CRCs are patched to match, so the archive stays
    valid and loads; only the numbers are wrong. Returns the entry's name."""
    import struct
    import zipfile

    with zipfile.ZipFile(model_ts) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert entry.compress_type == zipfile.ZIP_STORED
    with open(model_ts, "r+b") as f:
        f.seek(entry.header_offset)
        local = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = entry.header_offset + 30 + name_len + extra_len
        f.seek(start)
        data = bytearray(f.read(entry.file_size))
        for k in range(3, len(data), 4 * every):  # little-endian float32: byte 3 holds the sign and exponent
            data[k] ^= mask
        f.seek(start)
        f.write(data)
        crc = struct.pack("<I", zlib.crc32(data) & 0xFFFFFFFF)
        f.seek(entry.header_offset + 14)
        f.write(crc)
        # The central directory's copy of the CRC.
        f.seek(0)
        blob = f.read()
        name = entry.filename.encode()
        i = 0
        while True:
            i = blob.index(b"PK\x01\x02", i)
            n = struct.unpack("<H", blob[i + 28:i + 30])[0]
            if blob[i + 46:i + 46 + n] == name:
                f.seek(i + 16)
                f.write(crc)
                break
            i += 4
    return entry.filename


def largest_admitted_png(side: int = 6300) -> bytes:
    """A 16-bit grey PNG of ``side x side`` pixels (6300: 39.7 M, under the 40 M pixel limit; ~1.5 MB, under the
    6 MiB body limit) that compresses well: a gradient, a disc and coarse noise. The heaviest legal request: PNG has
    no reduced-scale decode, and 16-bit grey needs scaling to 8 bits."""
    y, x = np.mgrid[0:side, 0:side]
    arr = (x * 5 + y * 3).astype(np.uint16)
    disc = (x - side // 2) ** 2 + (y - side // 2) ** 2 < (side // 4) ** 2
    arr[disc] //= 2
    noise = np.random.default_rng(0).integers(0, 256, (side // 16 + 1, side // 16 + 1)).astype(np.uint16)
    arr += np.kron(noise, np.ones((16, 16), np.uint16))[:side, :side]
    return encode(Image.fromarray(arr), "PNG", compress_level=6)


def reorder_classes(d: Path) -> None:
    """Swap mel and nv in every file that names classes, consistently: the answers would swap with them."""
    def swap(classes: list[str]) -> list[str]:
        i, j = classes.index("mel"), classes.index("nv")
        classes[i], classes[j] = classes[j], classes[i]
        return classes

    for name in ("classes.json", "metrics.json", "reference_stats.json", "known_answers.json"):
        doc = json.loads((d / name).read_text())
        if "classes" in doc:
            doc["classes"] = swap(list(doc["classes"]))
        if name == "known_answers.json":
            for answer in doc["answers"]:
                p = answer["probabilities"]
                p["mel"], p["nv"] = p["nv"], p["mel"]
        (d / name).write_text(json.dumps(doc))


def another_model(d: Path) -> None:
    """Replace model.ts by another valid model of the same architecture and shape (another seed's head)."""
    import torch

    from lesionml.models import build_model, export_torchscript
    from lesionml.preprocessing import read_spec

    spec = read_spec(d / "preprocessing.json")
    torch.manual_seed(1234)
    model, _ = build_model(spec.arch, 7, pretrained=False, image_size=(spec.height, spec.width))
    export_torchscript(model.eval(), torch.zeros(1, 3, spec.height, spec.width), str(d / "model.ts"))
