"""The naive baseline the serving benchmark compares against: one process, one request at a time.

``http.server`` (single-threaded), Pillow through :func:`lesionml.preprocessing.preprocess`, the eager PyTorch
model rebuilt from ``model.pt`` (torch's default threads), probabilities as JSON. What a first version of the
server would look like; it is never used in production.

    python -m benchmarks.inference.naive_server MODEL_DIR PORT [THREADS]

THREADS sets ``torch.set_num_threads`` (default: torch's own default, one per core).
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import torch

from lesionml.models import build_model
from lesionml.preprocessing import preprocess, read_spec


def main(model_dir: Path, port: int, threads: int | None = None) -> None:
    """Serve ``model_dir`` on 127.0.0.1:``port`` until killed."""
    if threads:
        torch.set_num_threads(threads)
    spec = read_spec(model_dir / "preprocessing.json")
    classes = json.loads((model_dir / "classes.json").read_text())["classes"]
    model, _ = build_model(spec.arch, len(classes), pretrained=False, image_size=(spec.height, spec.width))
    model.load_state_dict(torch.load(model_dir / "model.pt", map_location="cpu", weights_only=True))
    model.eval()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._reply(200, {"status": "ok"})

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                x = torch.from_numpy(preprocess(body, spec))[None]
            except Exception as e:  # the baseline only needs to answer
                self._reply(400, {"error": str(e)})
                return
            with torch.no_grad():
                probs = torch.softmax(model(x), dim=1)[0].tolist()
            self._reply(200, {"predicted_class": classes[max(range(len(probs)), key=probs.__getitem__)],
                              "probabilities": dict(zip(classes, probs, strict=True))})

        def _reply(self, status: int, doc: dict[str, object]) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    class Server(HTTPServer):
        # The default backlog of 5 resets connections at concurrency 16; a deeper queue keeps the comparison about
        # serving, not about refused connections.
        request_queue_size = 128

    Server(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
