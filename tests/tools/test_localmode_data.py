"""``python -m localmode run --data DIR``: a folder that cannot train a model fails loudly, never SUCCEEDED."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from localmode import __main__ as localmode_main
from tests.tools.helpers import one_error_line

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture
def no_cloud(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the pipeline would start: these mistakes must be caught first."""
    def started(*args: object, **kwargs: object) -> int:
        raise AssertionError("run() started on unusable data")
    monkeypatch.setattr(localmode_main, "run", started)


@pytest.mark.parametrize(("make", "expected"), [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "f.txt").write_text("x") and d / "f.txt", "is not a folder"),
    (lambda d: (d / "images").mkdir() or d, "no images"),
    (lambda d: _copy_images(d) and d, "no metadata CSV"),
    (lambda d: _copy_images(d) and (d / "labels.csv").write_text("a,b\n1,2\n") and d,
     "is not a label CSV of a known format"),
])
def test_unusable_data_fails_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_cloud: None,
                                             make: object, expected: str) -> None:
    data = make(tmp_path)  # type: ignore[operator]
    code = localmode_main.main(["run", "--data", str(data), "--work-dir", str(tmp_path / "work")])
    assert code == 1
    assert expected in one_error_line(capsys.readouterr().err)


def _copy_images(folder: Path, n: int = 3) -> bool:
    (folder / "images").mkdir(exist_ok=True)
    for path in sorted((SAMPLE / "images").glob("*.jpg"))[:n]:
        shutil.copy(path, folder / "images")
    return True


def test_images_that_all_fail_validation_fail_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Files named like images that are not: every upload is quarantined, and the run says so and exits 1."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    ids = [p.stem for p in sorted((SAMPLE / "images").glob("*.jpg"))[:3]]
    for image_id in ids:
        (data / "images" / f"{image_id}.jpg").write_bytes(b"this is not a JPEG " * 20)
    header, *rows = (SAMPLE / "HAM10000_metadata.csv").read_text().splitlines()
    (data / "labels.csv").write_text("\n".join([header, *[r for r in rows if r.split(",")[1] in ids]]) + "\n")

    code = localmode_main.main(["run", "--data", str(data), "--work-dir", str(tmp_path / "work")])

    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no image under" in line and "passed validation" in line and "QUARANTINED" in line.upper()
