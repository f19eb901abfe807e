"""``tools.download_isic`` against a local stand-in for the ISIC Archive API v2 (127.0.0.1 only)."""

from __future__ import annotations

import csv
import hashlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from tests.tools.helpers import assert_all_flags_have_help, one_error_line
from tools import download_isic
from tools.download_isic import build_parser, download_dataset, main, map_label
from tools.progress import Progress

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "images"
IDS = ("ISIC_0024323", "ISIC_0024360", "ISIC_0024370")
# Not the built-in default (212): proves the collection is looked up by name.
HAM_COLLECTION = 901
EMPTY_COLLECTION = 902


@dataclass
class FakeArchive:
    """State of the fake archive: what it serves and what it was asked."""

    base: str = ""
    blobs: dict[str, bytes] = field(default_factory=dict)
    requests: Counter = field(default_factory=Counter)
    truncate: set[str] = field(default_factory=set)  # always send half the file
    truncate_once: set[str] = field(default_factory=set)  # send half the file the first time only
    lock: threading.Lock = field(default_factory=threading.Lock)

    def records(self) -> list[dict]:
        diagnoses = [
            {"diagnosis": "melanoma", "benign_malignant": "malignant", "lesion_id": "HAM_0002493"},
            {"diagnosis": "basal cell carcinoma", "benign_malignant": "malignant", "lesion_id": "HAM_0005530"},
            # The newer hierarchical schema, without a flat ``diagnosis``.
            {"diagnosis_1": "Benign", "diagnosis_2": "Benign soft tissue proliferations - Vascular",
             "diagnosis_3": "Hemangioma", "lesion_id": "HAM_0001780"},
        ]
        out = []
        for isic_id, clinical in zip(IDS, diagnoses, strict=True):
            blob = self.blobs[isic_id]
            out.append({
                "isic_id": isic_id, "public": True, "copyright_license": "CC-BY-NC",
                "attribution": "ViDIR Group, Department of Dermatology, Medical University of Vienna",
                "files": {"full": {"url": f"{self.base}/files/{isic_id}.jpg", "size": len(blob)},
                          "thumbnail_256": {"url": f"{self.base}/files/{isic_id}_thumb.jpg", "size": 1}},
                "metadata": {"acquisition": {"image_type": "dermoscopic"}, "clinical": clinical},
            })
        return out


def _handler(archive: FakeArchive) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output quiet
            pass

        def _json(self, doc: object, status: int = 200) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            with archive.lock:
                archive.requests[url.path] += 1
                first_time = archive.requests[url.path] == 1
            if url.path == "/api/v2/collections/":
                page1 = [{"id": 61, "name": "Challenge 2016: Test", "public": True},
                         {"id": 249, "name": "BCN20000", "public": True}]
                page2 = [{"id": HAM_COLLECTION, "name": "HAM10000", "public": True}]
                if query.get("cursor") == "2":
                    return self._json({"count": 3, "next": None, "previous": None, "results": page2})
                return self._json({"count": 3, "next": f"{archive.base}/api/v2/collections/?cursor=2",
                                   "previous": None, "results": page1})
            if url.path == "/api/v2/images/search/":
                if query.get("collections") == str(EMPTY_COLLECTION):
                    return self._json({"count": 0, "next": None, "previous": None, "results": []})
                if query.get("collections") != str(HAM_COLLECTION):
                    return self._json({"detail": "unknown collection"}, 400)
                records = archive.records()
                if query.get("cursor") == "p2":
                    return self._json({"count": len(records), "next": None, "previous": None,
                                       "results": records[2:]})
                nxt = f"{archive.base}/api/v2/images/search/?collections={HAM_COLLECTION}&limit=2&cursor=p2"
                return self._json({"count": len(records), "next": nxt, "previous": None, "results": records[:2]})
            if url.path.startswith("/files/"):
                isic_id = url.path.rsplit("/", 1)[1].removesuffix(".jpg")
                blob = archive.blobs.get(isic_id)
                if blob is None:
                    return self._json({"detail": "not found"}, 404)
                if isic_id in archive.truncate or (isic_id in archive.truncate_once and first_time):
                    blob = blob[: len(blob) // 2]
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)
                return None
            return self._json({"detail": "no route"}, 404)

    return Handler


@pytest.fixture
def archive(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeArchive]:
    """A fake archive on 127.0.0.1 serving three real sample JPEGs over two result pages."""
    monkeypatch.setattr(download_isic, "BACKOFF_S", 0.01)
    state = FakeArchive(blobs={i: (SAMPLE / f"{i}.jpg").read_bytes() for i in IDS})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _run(archive: FakeArchive, out: Path, **kwargs: object) -> download_isic.DownloadReport:
    return download_dataset(out, dataset="ham10000", base_url=f"{archive.base}/api/v2", workers=3,
                            progress=False, **kwargs)  # type: ignore[arg-type]


def _file_requests(archive: FakeArchive) -> dict[str, int]:
    return {p.rsplit("/", 1)[1]: n for p, n in archive.requests.items() if p.startswith("/files/")}


def test_full_download_writes_images_labels_and_manifest(archive: FakeArchive, tmp_path: Path) -> None:
    report = _run(archive, tmp_path)

    assert (report.listed, report.downloaded, report.skipped, report.failed) == (3, 3, 0, 0)
    for isic_id in IDS:
        assert (tmp_path / "images" / f"{isic_id}.jpg").read_bytes() == archive.blobs[isic_id]
    assert not list((tmp_path / "images").glob("*.part"))
    # Both listing endpoints were followed to their second page.
    assert archive.requests["/api/v2/collections/"] == 2
    assert archive.requests["/api/v2/images/search/"] == 2

    rows = {r["isic_id"]: r for r in csv.DictReader((tmp_path / "metadata.csv").open())}
    assert set(rows) == set(IDS)
    assert (rows["ISIC_0024323"]["ham7"], rows["ISIC_0024323"]["isic8"]) == ("mel", "mel")
    assert rows["ISIC_0024323"]["lesion_id"] == "HAM_0002493"
    assert rows["ISIC_0024323"]["diagnosis"] == "melanoma"
    assert (rows["ISIC_0024360"]["ham7"], rows["ISIC_0024360"]["benign_malignant"]) == ("bcc", "malignant")
    assert rows["ISIC_0024370"]["diagnosis"] == "Hemangioma"
    assert (rows["ISIC_0024370"]["ham7"], rows["ISIC_0024370"]["isic8"]) == ("vasc", "vasc")

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["collections"] == [HAM_COLLECTION]
    for isic_id in IDS:
        blob = archive.blobs[isic_id]
        assert manifest["files"][isic_id] == {"file": f"images/{isic_id}.jpg", "size": len(blob),
                                              "sha256": hashlib.sha256(blob).hexdigest()}
    records = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert {r["isic_id"] for r in records} == set(IDS) and all("files" not in r for r in records)


def test_resume_fetches_only_missing_and_corrupt_files(archive: FakeArchive, tmp_path: Path) -> None:
    _run(archive, tmp_path)
    archive.requests.clear()
    (tmp_path / "images" / "ISIC_0024323.jpg").unlink()
    corrupt = tmp_path / "images" / "ISIC_0024360.jpg"
    data = bytearray(corrupt.read_bytes())
    data[100] ^= 0xFF  # same size, different content: only the sha256 can tell
    corrupt.write_bytes(bytes(data))

    report = _run(archive, tmp_path)

    assert (report.downloaded, report.skipped, report.failed) == (2, 1, 0)
    assert _file_requests(archive) == {"ISIC_0024323.jpg": 1, "ISIC_0024360.jpg": 1}
    for isic_id in IDS:
        assert (tmp_path / "images" / f"{isic_id}.jpg").read_bytes() == archive.blobs[isic_id]

    archive.requests.clear()
    report = _run(archive, tmp_path)
    assert (report.downloaded, report.skipped) == (0, 3)
    assert _file_requests(archive) == {}


def test_truncated_file_is_retried(archive: FakeArchive, tmp_path: Path) -> None:
    archive.truncate_once.add("ISIC_0024370")

    report = _run(archive, tmp_path)

    assert (report.downloaded, report.failed) == (3, 0)
    assert _file_requests(archive)["ISIC_0024370.jpg"] == 2
    assert (tmp_path / "images" / "ISIC_0024370.jpg").read_bytes() == archive.blobs["ISIC_0024370"]


def test_always_truncated_file_fails_clearly_and_leaves_nothing(archive: FakeArchive, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    archive.truncate.add("ISIC_0024370")

    code = main(["--dataset", "ham10000", "--out", str(tmp_path), "--base-url", f"{archive.base}/api/v2",
                 "--retries", "2", "--workers", "2"])

    assert code == 1
    err = capsys.readouterr().err
    assert "ISIC_0024370" in err and "the archive states" in err
    assert _file_requests(archive)["ISIC_0024370.jpg"] == 3
    assert not (tmp_path / "images" / "ISIC_0024370.jpg").exists()
    assert not list((tmp_path / "images").glob("*.part"))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"ISIC_0024323", "ISIC_0024360"}
    rows = list(csv.DictReader((tmp_path / "metadata.csv").open()))
    assert {r["isic_id"] for r in rows} == {"ISIC_0024323", "ISIC_0024360"}

    # Once the archive serves it whole, a re-run fetches just that file.
    archive.truncate.clear()
    archive.requests.clear()
    assert main(["--out", str(tmp_path), "--base-url", f"{archive.base}/api/v2"]) == 0
    assert _file_requests(archive) == {"ISIC_0024370.jpg": 1}


def test_limit_and_explicit_collection(archive: FakeArchive, tmp_path: Path) -> None:
    report = _run(archive, tmp_path, collections=[HAM_COLLECTION], limit=2)

    assert (report.listed, report.downloaded) == (2, 2)
    assert archive.requests["/api/v2/collections/"] == 0  # given explicitly: no lookup
    assert archive.requests["/api/v2/images/search/"] == 1  # the limit was reached on the first page


def test_listing_error_exits_non_zero(archive: FakeArchive, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--out", str(tmp_path), "--base-url", f"{archive.base}/api/v2", "--collection", "7"])

    assert code == 1
    assert "HTTP 400" in capsys.readouterr().err


@pytest.mark.parametrize(("diagnoses", "expected"), [
    (["actinic keratosis"], ("akiec", "ak")),
    (["Squamous cell carcinoma, Invasive"], ("", "scc")),  # invasive SCC: no ham7 class
    (["Squamous cell carcinoma in situ"], ("akiec", "scc")),
    (["pigmented benign keratosis"], ("bkl", "bkl")),
    (["Solar lentigo"], ("bkl", "bkl")),
    (["dermatofibroma"], ("df", "df")),
    (["Melanoma Invasive", "Malignant melanocytic proliferations (Melanoma)"], ("mel", "mel")),
    (["Nevus, Junctional"], ("nv", "nv")),
    (["Benign"], ("", "")),
])
def test_map_label(diagnoses: list[str], expected: tuple[str, str]) -> None:
    assert map_label(diagnoses) == expected


def test_metadata_csv_is_a_label_file_the_validator_reads(archive: FakeArchive, tmp_path: Path) -> None:
    """download -> upload -> validate: the CSV carries the labels the validation function applies."""
    from lesion_common.labels import parse_metadata_csv

    _run(archive, tmp_path / "out")
    rows = parse_metadata_csv((tmp_path / "out" / "metadata.csv").read_text())
    written = list(csv.DictReader((tmp_path / "out" / "metadata.csv").open()))
    assert rows and len(rows) == len(written)
    by_id = {r["image_id"]: r for r in written}
    for row in rows:
        assert row.image_id in by_id and (row.label or "") == by_id[row.image_id]["ham7"]


def test_every_flag_has_help() -> None:
    assert_all_flags_have_help(build_parser())


def test_an_empty_listing_is_an_error_not_success(archive: FakeArchive, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--out", str(tmp_path), "--base-url", f"{archive.base}/api/v2", "--collection",
                 str(EMPTY_COLLECTION)])

    assert code == 1
    out, err = capsys.readouterr()
    assert "listed 0" in out
    assert "the archive listed no images for collections [902]" in one_error_line(err)


def test_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("x")

    assert main(["--out", str(tmp_path / "f"), "--base-url", "http://127.0.0.1:9/api/v2"]) == 1
    assert "is a file, not a folder" in one_error_line(capsys.readouterr().err)


def test_unreachable_archive_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download_isic, "BACKOFF_S", 0.0)
    # Port 9 (discard) on the loopback: nothing listens, the connection is refused at once.
    code = main(["--out", str(tmp_path), "--base-url", "http://127.0.0.1:9/api/v2", "--retries", "0"])

    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "images/search" in line and "after 1 attempts" in line


def test_progress_counts_bytes_rate_and_eta(archive: FakeArchive, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    bars: list[Progress] = []
    real = download_isic.Progress

    def spy(*args: object, **kwargs: object) -> Progress:
        bar = real(*args, **kwargs)  # type: ignore[arg-type]
        bars.append(bar)
        return bar

    monkeypatch.setattr(download_isic, "Progress", spy)
    _run(archive, tmp_path)
    total = sum(len(b) for b in archive.blobs.values())
    assert (bars[0].done, bars[0].bytes, bars[0].total_bytes) == (3, total, total)
    # A re-run skips all three: nothing left to move, nothing counted as moved.
    _run(archive, tmp_path)
    assert (bars[1].done, bars[1].bytes, bars[1].total_bytes) == (3, 0, 0)
