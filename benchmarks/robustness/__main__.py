"""``python -m benchmarks.robustness``: run every hostile-input class of issue 19 and print case, outcome, expected.

Each case is the test that attacks that class (the tests assert on behaviour and can fail); this runs them in one
pytest session, reads the outcomes from its JUnit report and prints one table. The load figure of item 4 comes
from ``python -m benchmarks.robustness.ping_under_load`` (RESULTS.md), which needs a quiet machine.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# (item, case, expected, test node id)
CASES = [
    ("1", "flipped weights, reordered classes, another model.ts, changed preprocessing (as found and resealed)",
     "refused, one line naming the file", "tests/inference/test_model_integrity.py::"
     "test_altered_directory_is_refused_as_found_and_after_regenerating_the_manifest"),
    ("1", "missing, extra and linked files", "refused, file named",
     "tests/inference/test_model_integrity.py::test_missing_extra_and_linked_files_are_named"),
    ("1", "a manifest that lies", "refused",
     "tests/inference/test_model_integrity.py::test_a_manifest_that_lies_is_refused"),
    ("1", "edited known answers", "caught by the server's own run",
     "tests/inference/test_model_integrity.py::test_known_answers_that_lie_are_caught_by_serving_not_trusted"),
    ("1", "changed preprocessing.json with a warm ONNX cache", "refused; the genuine directory still starts",
     "tests/inference/test_model_integrity.py::test_changed_preprocessing_never_poisons_the_export_cache"),
    ("1", "a poisoned cache entry", "exported again, never served",
     "tests/inference/test_model_integrity.py::test_a_poisoned_cache_entry_is_exported_again_not_served"),
    ("1", "broken directories through the real entry point", "exit 1, one line, /ping never 200",
     "tests/inference/test_startup.py::test_broken_model_directory_is_refused_with_the_reason"),
    ("2", "every JPEG marker type 0xC0-0xFE carrying text", "payload absent from the stored bytes",
     "tests/validate/test_strip_jpeg.py::test_no_marker_type_carries_text_into_the_stored_bytes"),
    ("2", "bytes after the last coded block", "found, image re-encoded",
     "tests/validate/test_strip_jpeg.py::test_even_a_few_bytes_after_the_last_block_are_found"),
    ("3", "a stray quote (oversized field) in a label CSV", "one row lost, reported",
     "tests/validate/test_validate_labels.py::test_a_stray_quote_costs_one_row_not_the_file"),
    ("3", "bad cells through the handler", "good rows applied, file quarantined with the reason",
     "tests/validate/test_validate_handler.py::test_one_bad_cell_costs_its_row_not_the_file"),
    ("3", "duplicate header names", "whole file quarantined",
     "tests/validate/test_validate_handler.py::test_duplicate_header_names_quarantine_the_whole_file"),
    ("4", "/ping while workers decode the largest admitted images", "answers within bound",
     "tests/inference/test_health_under_load.py::test_ping_answers_while_workers_decode_the_largest_images"),
    ("4", "slow senders", "408 and closed",
     "tests/inference/test_health_under_load.py::test_a_slow_sender_gets_408_and_is_closed"),
    ("4", "inference id over 64 characters", "400",
     "tests/inference/test_health_under_load.py::test_an_inference_id_longer_than_sagemaker_allows_is_refused"),
    ("5", "one picture under two keys", "one row, one split",
     "tests/unit/test_issue19_dataset.py::test_equal_sha256s_are_one_picture_in_one_split"),
    ("5", "two pictures with one file name", "both kept, redelivery changes nothing",
     "tests/validate/test_validate_handler.py::test_two_pictures_with_one_file_name_are_both_kept"),
    ("5", "the same image under two keys at once, 20 times", "exactly one VALIDATED each time",
     "tests/validate/test_issue16_duplicates.py"),
]


def outcomes(report: Path) -> dict[str, str]:
    """Node id prefix -> "held" when every test under it passed, else what went wrong."""
    result: dict[str, list[str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/") + ".py"
        name = case.get("name", "").split("[")[0]
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        status = "FAILED" if failed else "skipped" if skipped else "held"
        result.setdefault(f"{module}::{name}", []).append(status)
        result.setdefault(module, []).append(status)
    return {k: ("FAILED" if "FAILED" in v else "skipped" if "held" not in v else "held") for k, v in result.items()}


def main() -> int:
    """Run the cases; exit 1 if any did not hold."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", f"--junitxml={report}",
                        *sorted({node for *_, node in CASES})], cwd=REPO, capture_output=True, text=True)
        seen = outcomes(report)
    print("| item | case | outcome | expected |")
    print("| --- | --- | --- | --- |")
    bad = 0
    for item, case, expected, node in CASES:
        outcome = seen.get(node, "not run")
        bad += outcome != "held"
        print(f"| {item} | {case} | {outcome} | {expected} |")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
