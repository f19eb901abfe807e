"""Shared fixtures: paths to the repository and the data (pyproject's ``pythonpath`` puts the repository root and
the layers on sys.path, as Lambda and the images see them)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SHARED_DATA = REPO.parent / "shared" / "data"

# The `slow` marker (`make unit` leaves these out; `make test` runs them): tests that train, export or build a model,
# start servers or local mode in processes, read the real data sets or run cfn-lint; each takes seconds to minutes
# (measured with --durations, benchmarks/README.md has none of this). A whole module, or one test (any parameters).
SLOW = (
    "tests/training/test_training_job.py",
    "tests/training/test_model_dir_seal.py",
    "tests/training/test_training_lesionml.py",
    "tests/inference/test_classify_local_endpoint.py",
    "tests/inference/test_concurrency.py",
    "tests/inference/test_health_under_load.py",
    "tests/inference/test_localmode_endpoints.py",
    "tests/inference/test_model_integrity.py",
    "tests/inference/test_negatives.py",
    "tests/inference/test_serving_contract.py",
    "tests/inference/test_startup.py",
    "tests/monitoring/test_drift_real.py",
    "tests/localmode_server/test_up_faults.py",
    "tests/static/test_template.py::test_cfn_lint_passes",
    "tests/static/test_template.py::test_cfn_lint_catches_broken_copies",
    "tests/fidelity/test_deploy_rules.py::test_cfn_lint_informational_checks_pass",
    "tests/fidelity/test_deploy_rules.py::test_failed_async_invocation_lands_in_the_queue_and_is_redriven",
    "tests/tools/test_localmode_data.py::test_images_that_all_fail_validation_fail_the_run",
    "tests/monitoring/test_handlers.py::test_capture_files_give_drift_metrics_under_the_threshold",
    "tests/monitoring/test_report.py::test_report_with_everything",
    "tests/monitoring/test_stats.py::test_synthetic_calibration_and_power",
    "tests/unit/test_reconcile.py::test_batches_of_100_names_and_pages_of_1000_keys",
    "tests/unit/test_reconcile.py::test_local_mode_finds_a_lost_event_and_redrive_recovers_it",
    "tests/validate/test_issue16_duplicates.py::test_reads_per_upload_do_not_grow_with_the_index",
    "tests/validate/test_issue16_duplicates.py::test_copies_at_the_same_instant_end_as_one_validated",
    "tests/validate/test_issue16_duplicates.py::test_every_hash_within_the_radius_is_found_and_the_radius_is_tight",
    "tests/validate/test_validate_handler.py::test_every_negative_through_the_handler",
    "tests/validate/test_validate_handler.py::test_bundled_ham_csv_applies_every_row",
    "tests/validate/test_validate_handler.py::test_real_images_are_validated_clean_and_split",
    "tests/validate/test_validate_imaging.py::test_4000x3000_is_accepted_within_limits",
    "tests/validate/test_validate_fuzz.py",
    "tests/unit/test_localmode_training.py",
    "tests/unit/test_issue16_sharding.py::test_validated_items_spread_over_shards_and_check_data_reads_them_all",
    "tests/unit/test_training_handlers.py::test_volume_key_only_where_an_ebs_volume_is_attached",
    "tests/unit/test_issue19_dataset.py::test_uploads_to_dataset",
    "tests/localmode_iam/test_enforcement.py",
    "tests/inference/test_inference_units.py::test_large_pictures_of_any_format_are_reduced_right_after_decoding",
)
# Tests that need the inference test model (built once per checkout, ~15 s, then cached) are slow wherever they are.
SLOW_FIXTURES = {"model_dir"}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With slow tests deselected (``make unit``), do not even import a file whose every test is slow: collection
    would import torch and the like for nothing."""
    if "not slow" not in (config.option.markexpr or ""):
        return None
    try:
        relative = collection_path.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return None
    return True if relative in SLOW else None


def _exists(entry: str) -> bool:
    path, _, test = entry.partition("::")
    file = REPO / path
    return file.is_file() and (not test or f"def {test}(" in file.read_text())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of :data:`SLOW` and those using :data:`SLOW_FIXTURES` ``slow`` (before ``-m`` deselects);
    an entry of SLOW that names no file or test is an error: a renamed slow test must not slip into `make unit`."""
    stale = [entry for entry in SLOW if not _exists(entry)]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {stale}")
    for item in items:
        path, _, name = item.nodeid.partition("::")
        if (path in SLOW or f"{path}::{name.split('[', 1)[0]}" in SLOW
                or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real HAM10000 and the negatives); tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA
