"""Hyperparameter parsing and SageMaker path resolution (training_image.config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training_image.config import (
    ConfigError,
    build_config,
    parse_cli,
    read_hyperparameter_file,
    resolve_cluster,
    resolve_paths,
)


def test_defaults_and_string_values() -> None:
    default = build_config()
    assert default.arch == "efficientnet_lite0" and default.image_size == (150, 200)
    cfg = build_config(
        {"epochs": "3", "lr": "0.01", "pretrained": "False", "image_size": "224", "num_workers": "2", "amp": "BF16"}
    )
    assert (cfg.epochs, cfg.lr, cfg.pretrained, cfg.image_size, cfg.num_workers, cfg.amp) == (
        3, 0.01, False, (224, 224), 2, "bf16",
    )
    assert build_config({"image_size": "320x240"}).image_size == (240, 320)
    assert build_config({"epochs": "3.0"}).epochs == 3


def test_sagemaker_quirks_are_accepted() -> None:
    cfg = build_config(
        {
            "arch": '"mobilenet_v2"',  # framework estimators JSON-encode values
            "sagemaker_program": "train.py",
            "sagemaker_region": '"eu-west-1"',
            "_tuning_objective_metric": "validation:balanced_accuracy",
            "epochs": 4,  # SM_HPS carries typed JSON
            "dry_run": True,
        }
    )
    assert (cfg.arch, cfg.epochs, cfg.dry_run) == ("mobilenet_v2", 4, True)


@pytest.mark.parametrize(
    ("hps", "message"),
    [
        ({"epochs": "abc"}, "hyperparameter epochs='abc' is invalid: expected an integer"),
        ({"epochs": "2.5"}, "epochs='2.5' is invalid: expected an integer"),
        ({"epochs": "0"}, "epochs='0' is invalid: must be 1..1000"),
        ({"lr": "fast"}, "lr='fast' is invalid: expected a number"),
        ({"lr": "nan"}, "lr='nan' is invalid: expected a finite number"),
        ({"pretrained": "maybe"}, "pretrained='maybe' is invalid: expected true or false"),
        ({"image_size": "200by150"}, "image_size='200by150' is invalid: expected WIDTHxHEIGHT"),
        ({"arch": "vgg16"}, "arch='vgg16' is invalid: expected one of resnet50"),
        ({"label_set": "ham8"}, "label_set='ham8' is invalid"),
        ({"imbalance": "smote"}, "imbalance='smote' is invalid: expected one of sampler, none"),
        # Measured worse and removed (benchmarks/training/RESULTS.md): a job asking for them fails at once.
        ({"imbalance": "loss"}, "imbalance='loss' is invalid: expected one of sampler, none"),
        ({"imbalance": "logit_adjusted"}, "imbalance='logit_adjusted' is invalid"),
        ({"class_bias": "search"}, "class_bias='search' is invalid: expected one of validation, none"),
        ({"ema_decay": "1"}, "ema_decay='1' is invalid: must be in [0, 1)"),
        ({"learning_rate": "0.1"}, "unknown hyperparameter 'learning_rate'; known: acquisition_aug, amp, arch"),
    ],
)
def test_bad_values_name_the_hyperparameter(hps: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(hps)
    assert message in str(err.value)


def test_later_sources_win_and_round_trip() -> None:
    cfg = build_config({"epochs": "abc", "lr": "0.5"}, {}, parse_cli(["--epochs", "7", "--lr=0.1", "--dry-run", "1"]))
    assert (cfg.epochs, cfg.lr, cfg.dry_run) == (7, 0.1, True)
    assert build_config(cfg.as_strings()) == cfg


def test_one_declaration_gives_defaults_strings_and_help() -> None:
    from training_image.config import HYPERPARAMETERS, Config

    # The dataclass's defaults are the declared strings, parsed; as_strings writes them back in declaration order.
    assert Config() == build_config({name: hp.default for name, hp in HYPERPARAMETERS.items()}) == build_config()
    assert list(Config().as_strings()) == list(HYPERPARAMETERS) == list(Config.__dataclass_fields__)
    odd = build_config({"image_size": "320x240", "threads": "auto", "num_workers": "3", "pretrained": "0"})
    assert {k: odd.as_strings()[k] for k in ("image_size", "threads", "num_workers", "pretrained")} == {
        "image_size": "320x240", "threads": "auto", "num_workers": "3", "pretrained": "false",
    }
    assert all(hp.help for hp in HYPERPARAMETERS.values())


@pytest.mark.parametrize("argv", [["epochs", "3"], ["--epochs"], ["--"]])
def test_malformed_command_line(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        parse_cli(argv)


def test_paths_follow_sagemaker_and_overrides(tmp_path: Path) -> None:
    default = resolve_paths({})
    assert default.model_dir == Path("/opt/ml/model")
    assert default.failure_file == Path("/opt/ml/output/failure")
    assert default.checkpoint_dir == Path("/opt/ml/checkpoints")
    (tmp_path / "input" / "data" / "manifests").mkdir(parents=True)
    other = tmp_path / "elsewhere"
    other.mkdir()
    paths = resolve_paths({"SM_BASE_DIR": str(tmp_path), "SM_CHANNEL_IMAGES": str(other), "SM_MODEL_DIR": "/m"})
    assert paths.model_dir == Path("/m")
    assert paths.output_data_dir == tmp_path / "output" / "data"
    assert paths.channel("manifests") == tmp_path / "input" / "data" / "manifests"
    assert paths.channel("images") == other
    assert paths.channel("baseline") is None


def test_hyperparameter_file_must_be_a_json_object(tmp_path: Path) -> None:
    paths = resolve_paths({"SM_BASE_DIR": str(tmp_path)})
    assert read_hyperparameter_file(paths) == {}
    (tmp_path / "input" / "config").mkdir(parents=True)
    (tmp_path / "input" / "config" / "hyperparameters.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        read_hyperparameter_file(paths)


def test_cluster_from_env_and_resourceconfig(tmp_path: Path) -> None:
    config = tmp_path / "input" / "config"
    config.mkdir(parents=True)
    (config / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-2", "hosts": ["algo-2", "algo-1"]}))
    cluster = resolve_cluster(resolve_paths({"SM_BASE_DIR": str(tmp_path), "SM_NUM_GPUS": "4"}), lambda: 0)
    assert cluster.hosts == ("algo-1", "algo-2") and cluster.current_host == "algo-2"
    assert cluster.world_size == 8
    single = resolve_cluster(resolve_paths({"SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1"}), lambda: 0)
    assert single.world_size == 1
    with pytest.raises(ConfigError):
        resolve_cluster(resolve_paths({"SM_HOSTS": "algo-1"}), lambda: 0)
    with pytest.raises(ConfigError):
        resolve_cluster(resolve_paths({"SM_HOSTS": '["a"]', "SM_CURRENT_HOST": "b"}), lambda: 0)


def test_readme_documents_every_hyperparameter() -> None:
    from training_image.config import HYPERPARAMETERS

    readme = (Path(__file__).resolve().parents[2] / "training_image" / "README.md").read_text()
    missing = [name for name in HYPERPARAMETERS if f"| `{name}` |" not in readme]
    assert not missing, f"training_image/README.md lacks {missing}"


def test_eval_batch_size_auto_and_test_time_views() -> None:
    import torch

    from training_image.runtime import eval_batch_size

    default = build_config()
    assert default.eval_batch_size == -1 and default.as_strings()["eval_batch_size"] == "auto"
    assert default.tta == "dihedral"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (eval_batch_size(default, cpu), eval_batch_size(default, cuda)) == (4, 64)
    # Images per forward pass: a 4-view model takes 4 of them per loaded image.
    assert (eval_batch_size(default, cpu, views=4), eval_batch_size(default, cuda, views=4)) == (1, 16)
    fixed = build_config({"eval_batch_size": "32", "tta": "none"})
    assert (eval_batch_size(fixed, cpu), eval_batch_size(fixed, cpu, views=8)) == (32, 4)
    assert fixed.as_strings()["eval_batch_size"] == "32"
    for bad in ({"eval_batch_size": "0"}, {"eval_batch_size": "many"}, {"tta": "rot90"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            build_config(bad)
