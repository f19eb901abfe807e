"""``python -m tools.classify`` against a real serving process behind boto3 (localmode.endpoints under moto)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from moto import mock_aws

from localmode.endpoints import LocalEndpoints
from tools import classify

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "images"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, cache_dir: Path) -> Iterator[Path]:
    """Endpoint ``lesion-cli`` in service, capturing to the returned folder."""
    capture = tmp_path_factory.mktemp("cli-capture")
    with mock_aws(), LocalEndpoints(tmp_path_factory.mktemp("cli-local"),
                                    env={"SERVING_CACHE_DIR": str(cache_dir), "CAPTURE_DIR": str(capture)}) as eps:
        eps.install()
        eps.start("lesion-cli", model_dir, version="5")
        yield capture


def test_classify_through_a_local_endpoint(endpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    images = sorted(SAMPLE.glob("*.jpg"))[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:200])  # a JPEG cut short: the container refuses it
    out_csv = tmp_path / "answers.csv"
    code = classify.main(["--endpoint", "lesion-cli", "--region", "us-east-1", "--inference-id-from-filename",
                          "--csv", str(out_csv), *map(str, images), str(broken)])
    out, err = capsys.readouterr()
    assert code == 1, err  # the broken file fails, the other two are answered
    assert "error: 1 of 3 image(s) failed" in err and "Traceback" not in err
    lines = out.splitlines()
    assert "FAILED: the model answered 400:" in lines[2] and "corrupt_image" in lines[2]
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["inference_id"] for r in rows] == [images[0].stem, images[1].stem, "broken"]
    for row, line in zip(rows[:2], lines[:2], strict=True):
        assert row["error"] == "" and row["model_version"] == "5"
        assert row["predicted_class"] in {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
        assert 0.0 <= float(row["melanoma_probability"]) <= 1.0 and row["melanoma_at_risk"] in ("true", "false")
        assert f" {row['predicted_class']} " in line
    # The InferenceId reached the container: its capture records carry each file's name.
    records = [json.loads(line) for f in endpoint.glob("capture-*.jsonl") for line in f.read_text().splitlines()]
    assert sorted(r["inference_id"] for r in records) == sorted(i.stem for i in images)
