"""``make deploy``'s arguments: guided the first time, the image URIs added to samconfig's overrides."""

from __future__ import annotations

from pathlib import Path

from tools.deploy_args import deploy_args

CONFIG = '''version = 0.1
[default.deploy.parameters]
parameter_overrides = ["AutoApprove=false", "UseSpotTraining=true"]
[prod.deploy.parameters]
parameter_overrides = "AutoApprove=false TrainingImageUri=old InferenceImageUri=old"
'''


def test_first_deploy_is_guided_and_keeps_the_overrides(tmp_path: Path) -> None:
    (tmp_path / "samconfig.toml").write_text(CONFIG)
    (tmp_path / "images.env").write_text("TrainingImageUri=t:1\nInferenceImageUri=i:1\n")
    args = deploy_args(tmp_path / "samconfig.toml", tmp_path / "images.env")
    assert args == ["--guided", "--parameter-overrides", "AutoApprove=false", "UseSpotTraining=true",
                    "InferenceImageUri=i:1", "TrainingImageUri=t:1"]


def test_later_deploys_replace_the_saved_uris(tmp_path: Path) -> None:
    (tmp_path / "samconfig.toml").write_text(CONFIG)
    (tmp_path / "images.env").write_text("TrainingImageUri=t:2\nInferenceImageUri=i:2\n")
    assert deploy_args(tmp_path / "samconfig.toml", tmp_path / "images.env", "prod") == [
        "--parameter-overrides", "AutoApprove=false", "InferenceImageUri=i:2", "TrainingImageUri=t:2"]
    assert deploy_args(tmp_path / "samconfig.toml", tmp_path / "none.env", "prod") == []
