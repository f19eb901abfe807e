"""Hyperparameters and SageMaker paths of the training job (no torch import: errors here must be fast).

Paths follow the SageMaker training contract: everything under ``/opt/ml`` unless an environment variable says
otherwise.

=======================  ======================================================================
Variable                 Meaning (default)
=======================  ======================================================================
``SM_BASE_DIR``          root replacing ``/opt/ml`` for every path below (not a SageMaker variable;
                         lets tests and local mode lay out a fake job directory anywhere)
``SM_MODEL_DIR``         model artefacts (``<base>/model``)
``SM_OUTPUT_DIR``        where ``failure`` is written (``<base>/output``)
``SM_OUTPUT_DATA_DIR``   small outputs: metrics.json, evaluation/ (``<base>/output/data``)
``SM_INPUT_CONFIG_DIR``  hyperparameters.json, resourceconfig.json (``<base>/input/config``)
``SM_CHANNEL_<NAME>``    a data channel (``<base>/input/data/<name>``)
``SM_CHECKPOINT_DIR``    checkpoints, synced to S3 by SageMaker (``<base>/checkpoints``; not a SageMaker variable)
``SM_HPS``               JSON object of hyperparameters, overriding hyperparameters.json
``SM_HOSTS``             JSON list of hosts (resourceconfig.json, else one host)
``SM_CURRENT_HOST``      this host (resourceconfig.json, else ``algo-1``)
``SM_NUM_GPUS``          GPUs on this host (else what torch sees)
=======================  ======================================================================

Hyperparameters come from ``hyperparameters.json`` (all values strings, as SageMaker writes them), then
``SM_HPS``, then command-line flags (``--epochs 3`` or ``--epochs=3``); later sources win. SageMaker's own keys
(``sagemaker_*``, ``_tuning_objective_metric``) are ignored; any other unknown name is an error.

Each hyperparameter is declared once, as a field of :class:`Config`: its type, its :class:`Kind` (how it reads
from and writes back to SageMaker's string form), its default as SageMaker would pass it, its help and its range.
Parsing (:func:`build_config`), :meth:`Config.as_strings` and :data:`HYPERPARAMETERS` all derive from that.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

from lesionml.archs import ARCHITECTURES
from lesionml.labels import LABEL_SETS


class ConfigError(ValueError):
    """A bad hyperparameter, path or input; the message goes to the failure file as is."""


def _parse_bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("true", "1", "yes", "y", "on"):
        return True
    if s in ("false", "0", "no", "n", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_int(v: str) -> int:
    s = v.strip()
    if not re.fullmatch(r"[+-]?\d+", s):
        # Accept "3.0" (some tools stringify numbers as floats) but not "3.5".
        f = float(s)
        if not f.is_integer():
            raise ValueError("expected an integer")
        return int(f)
    return int(s)


def _parse_float(v: str) -> float:
    f = float(v.strip())
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return f


def _parse_layer_name(v: str) -> str:
    s = v.strip()
    if s and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", s):
        raise ValueError("expected a dotted layer name such as net._blocks.3")
    return s


def _parse_image_size(v: str) -> tuple[int, int]:
    """``"200x150"`` (width x height, like PIL and HAM10000) or ``"224"`` (square); returns (height, width)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", v)
    if not m:
        raise ValueError('expected WIDTHxHEIGHT such as "200x150", or one number for a square')
    w = int(m.group(1))
    h = int(m.group(2)) if m.group(2) else w
    if not (16 <= w <= 2048 and 16 <= h <= 2048):
        raise ValueError("width and height must be between 16 and 2048")
    return h, w


def _detail_size(v: str) -> tuple[int, int]:
    """``auto`` (-1, -1), ``none`` (0, 0) or ``WIDTHxHEIGHT``; returns (height, width) like ``image_size``."""
    s = v.strip().lower()
    if s == "auto":
        return -1, -1
    if s == "none":
        return 0, 0
    try:
        return _parse_image_size(s)
    except ValueError:
        raise ValueError('expected "auto", "none" or WIDTHxHEIGHT such as "200x150"') from None


def _format_detail(hw: tuple[int, int]) -> str:
    return {(-1, -1): "auto", (0, 0): "none"}.get(hw, f"{hw[1]}x{hw[0]}")


def _optional_label_set(v: str) -> str:
    s = v.strip().lower()
    if s and s not in LABEL_SETS:
        raise ValueError(f"expected one of {', '.join(LABEL_SETS)} (or empty: take it from classes.json)")
    return s


def _arch(v: str) -> str:
    s = v.strip().lower()
    if s not in ARCHITECTURES:
        raise ValueError(f"expected one of {', '.join(ARCHITECTURES)}")
    return s


def _auto_or_int(v: str) -> int:
    """``auto`` is -1; otherwise a non-negative integer."""
    if v.strip().lower() == "auto":
        return -1
    n = _parse_int(v)
    if n < 0:
        raise ValueError('expected "auto" or a non-negative integer')
    return n


T = TypeVar("T")


@dataclass(frozen=True)
class Kind(Generic[T]):
    """How one type of hyperparameter reads from and writes back to SageMaker's string form."""

    parse: Callable[[str], T]
    format: Callable[[T], str] = str
    # The reason given when ``parse`` fails without an "expected ..." message of its own.
    hint: str = "malformed value"


INT: Kind[int] = Kind(_parse_int, hint="expected an integer")
FLOAT: Kind[float] = Kind(_parse_float, hint="expected a number")
BOOL: Kind[bool] = Kind(_parse_bool, lambda b: "true" if b else "false")
AUTO_INT: Kind[int] = Kind(_auto_or_int, lambda n: "auto" if n == -1 else str(n))  # "auto" is -1
IMAGE_SIZE: Kind[tuple[int, int]] = Kind(_parse_image_size, lambda hw: f"{hw[1]}x{hw[0]}")
DETAIL_SIZE: Kind[tuple[int, int]] = Kind(_detail_size, _format_detail)
LAYER_NAME: Kind[str] = Kind(_parse_layer_name)
ARCH: Kind[str] = Kind(_arch)
LABEL_SET: Kind[str] = Kind(_optional_label_set)


def _choice(*allowed: str) -> Kind[str]:
    def parse(v: str) -> str:
        s = v.strip().lower()
        if s not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return s

    return Kind(parse)


@dataclass(frozen=True)
class HP:
    """One hyperparameter: its kind, default (as SageMaker would pass it), help and range check."""

    kind: Kind[Any]
    default: str
    help: str
    check: Callable[[Any], bool] = lambda _: True
    check_msg: str = ""


def _hp(
    kind: Kind[T], default: str, help: str, check: Callable[[T], bool] | None = None, check_msg: str = ""
) -> T:
    """A :class:`Config` field declared once: the parsed default, and the :class:`HP` that reads and writes it."""
    spec = HP(kind, default, help, check or (lambda _: True), check_msg)
    return field(default=kind.parse(default), metadata={"hp": spec})


@dataclass(frozen=True)
class Config:
    """Validated hyperparameters, each declared once here: name, kind, default, help and range."""

    arch: str = _hp(ARCH, "efficientnet_lite0", "network architecture")
    pretrained: bool = _hp(BOOL, "true", "start from local ImageNet weights (never downloaded)")
    epochs: int = _hp(INT, "10", "maximum epochs", lambda v: 1 <= v <= 1000, "must be 1..1000")
    batch_size: int = _hp(
        INT, "32", "training batch size per process", lambda v: 1 <= v <= 4096, "must be 1..4096"
    )
    eval_batch_size: int = _hp(
        AUTO_INT, "auto",
        "images per forward pass in evaluation (a test-time-augmented model's views count as images); auto = 64 on "
        "a GPU, 4 on a CPU, where small batches stay in cache: 2.2x faster than 64 on the 2-core machine. On a CPU "
        "the layers that do not train also pass each training batch this many images at a time (same results)",
        lambda v: v == -1 or 1 <= v <= 4096, 'must be "auto" or 1..4096',
    )
    lr: float = _hp(
        FLOAT, "0.001", "peak learning rate of the head (AdamW)", lambda v: 0 < v <= 10, "must be in (0, 10]"
    )
    backbone_lr_scale: float = _hp(
        FLOAT, "0.3", "backbone learning rate = lr * this", lambda v: 0 < v <= 10, "must be in (0, 10]"
    )
    weight_decay: float = _hp(FLOAT, "0.01", "AdamW weight decay", lambda v: 0 <= v <= 1, "must be in [0, 1]")
    warmup_epochs: float = _hp(
        FLOAT, "1", "linear warm-up epochs (repeated for the backbone once unfrozen)", lambda v: v >= 0,
        "must be >= 0",
    )
    freeze_epochs: int = _hp(
        INT, "1", "epochs training only the head on a frozen backbone", lambda v: v >= 0, "must be >= 0"
    )
    trainable_from: str = _hp(
        LAYER_NAME, "",
        "first backbone layer that fine-tunes (e.g. net._blocks.3 for efficientnet_lite0, features.3 for "
        "torchvision EfficientNets/MobileNets, layer2 for resnet50); the layers before it keep their ImageNet "
        "weights. Empty: the whole backbone fine-tunes",
    )
    image_size: tuple[int, int] = _hp(IMAGE_SIZE, "200x150", "model input, WIDTHxHEIGHT or a single number")
    detail_size: tuple[int, int] = _hp(
        DETAIL_SIZE, "auto",
        "the most detail an image may bring, WIDTHxHEIGHT of its centred crop: larger pictures are reduced to it "
        "before anything else, in training and in serving (preprocessing.json), so that a sharper camera's picture "
        "reaches the network as the training images did. auto = the median training image; none = no cap",
    )
    color_constancy: str = _hp(
        _choice("shades_of_gray", "none"), "shades_of_gray",
        "colour constancy in the shared preprocessing (training and serving): shades_of_gray divides each channel "
        "by its 6-norm mean, undoing another illuminant or white balance",
    )
    tone: str = _hp(
        _choice("none", "median_gamma"), "none",
        "tone normalisation in the shared preprocessing (training and serving), after the colour constancy: "
        "median_gamma raises each picture to the power that brings the median of its brightest channel to mid-grey, "
        "undoing another camera's gamma",
    )
    acquisition_aug: float = _hp(
        FLOAT, "0.5",
        "fraction of training samples that also go through a random acquisition (lesionml.acquisition: squash, "
        "resolution, sharpening, gamma, colour cast, vignetting, JPEG)", lambda v: 0 <= v <= 1, "must be in [0, 1]",
    )
    label_set: str = _hp(LABEL_SET, "", "ham7 or isic8; empty takes the manifests' classes.json")
    seed: int = _hp(INT, "42", "random seed")
    patience: int = _hp(
        INT, "5", "early stopping: epochs without better validation balanced accuracy (0 = off)",
        lambda v: v >= 0, "must be >= 0",
    )
    num_workers: int = _hp(AUTO_INT, "auto", "data loader worker processes")
    amp: str = _hp(
        _choice("auto", "true", "false", "bf16", "fp16"), "auto", "mixed precision: auto = bf16 where fast"
    )
    channels_last: bool = _hp(BOOL, "true", "NHWC memory format (faster convolutions on CPU and tensor cores)")
    dry_run: bool = _hp(BOOL, "false", "one batch of each phase, one epoch, no checkpoints")
    max_train_images: int = _hp(
        INT, "0", "cap on training images, stratified (0 = all)", lambda v: v >= 0, "must be >= 0"
    )
    imbalance: str = _hp(
        _choice("sampler", "none"), "none",
        "class-balanced sampling, or plain cross-entropy (class_bias then starts from -log prior). The class-"
        "weighted and logit-adjusted losses measured worse and were removed (benchmarks/training/RESULTS.md)",
    )
    label_smoothing: float = _hp(
        FLOAT, "0.0", "cross-entropy label smoothing", lambda v: 0 <= v < 1, "must be in [0, 1)"
    )
    ema_decay: float = _hp(
        FLOAT, "0",
        "per-step decay of an exponential moving average of the weights that is validated, selected and exported "
        "instead of the raw weights (0 = off; e.g. 0.998 averages over roughly the last 500 steps)",
        lambda v: 0 <= v < 1, "must be in [0, 1)",
    )
    dropout: float = _hp(
        FLOAT, "0.2", "dropout before the classifier", lambda v: 0 <= v < 1, "must be in [0, 1)"
    )
    min_crop_scale: float = _hp(
        FLOAT, "0.35", "smallest random-crop area fraction", lambda v: 0 < v <= 1, "must be in (0, 1]"
    )
    melanoma_target_sensitivity: float = _hp(
        FLOAT, "0", "threshold policy: 0 = Youden's J on validation, else the validation sensitivity to reach",
        lambda v: 0 <= v < 1, "must be in [0, 1)",
    )
    threshold_policy: str = _hp(
        _choice("shifted", "validation"), "shifted",
        "validation = the threshold melanoma_target_sensitivity picks on the validation split; shifted = then "
        "lowered until the validation melanomas under every acquisition shift (lesionml.acquisition.SHIFTS) are "
        "caught as often as the clean ones, but never below melanoma_specificity_floor on clean validation",
    )
    melanoma_specificity_floor: float = _hp(
        FLOAT, "0.7", "threshold_policy=shifted: the lowest clean validation specificity the shift policy may lower "
        "the threshold to (a clean choice already below it stands, and metrics.json says below_floor)",
        lambda v: 0 <= v < 1, "must be in [0, 1)",
    )
    class_bias: str = _hp(
        _choice("validation", "none"), "validation",
        "per-class decision offsets (predicted class = arg-max of log p + offsets) chosen on the validation split: "
        "validation = the offsets that minimise its class-balanced cross-entropy (a convex fit, starting from -log "
        "prior with imbalance=none); none = plain arg-max",
    )
    tta: str = _hp(
        _choice("dihedral", "none"), "dihedral",
        "test-time augmentation of the exported model: dihedral = model.ts averages its probabilities over the "
        "label-preserving flips and turns of each image (4 views, 8 for a square input; that many times the "
        "inference compute); the final validation/test metrics describe that model, epochs are selected on one view",
    )
    cache_images: str = _hp(_choice("auto", "true", "false"), "auto", "keep decoded images in memory")
    reference_max_images: int = _hp(
        INT, "2000", "images used for reference_stats.json", lambda v: v >= 1, "must be >= 1"
    )
    threads: int = _hp(AUTO_INT, "auto", "torch intra-op threads")

    def as_strings(self) -> dict[str, str]:
        """Hyperparameters as SageMaker would pass them (for metrics.json and checkpoints)."""
        return {name: hp.kind.format(getattr(self, name)) for name, hp in HYPERPARAMETERS.items()}


# Declaration order: the order of as_strings() and of metrics.json's hyperparameters.
HYPERPARAMETERS: dict[str, HP] = {f.name: f.metadata["hp"] for f in fields(Config)}

_IGNORED_PREFIXES = ("sagemaker_", "_tuning_objective_metric", "_sagemaker")


def _unquote(value: Any) -> str:
    """SageMaker framework estimators JSON-encode values, so ``"\\"abc\\""`` arrives for ``abc``."""
    if isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, str):
        return json.dumps(value)
    s = value.strip()
    if len(s) >= 2 and s[0] == s[-1] == '"':
        try:
            decoded = json.loads(s)
        except ValueError:
            return s
        return decoded if isinstance(decoded, str) else s
    return s


def parse_cli(argv: Sequence[str]) -> dict[str, str]:
    """``--name value`` / ``--name=value`` pairs to a dict; anything else is a ConfigError."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; use --name value")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"argument --{name} needs a value")
            value = argv[i + 1]
            i += 1
        out[name.replace("-", "_")] = value
        i += 1
    return out


def build_config(*sources: Mapping[str, Any]) -> Config:
    """Merge hyperparameter sources (later wins), validate and return a :class:`Config`.

    Raises
    ------
    ConfigError
        Naming the first unknown or malformed hyperparameter.
    """
    raw: dict[str, str] = {name: hp.default for name, hp in HYPERPARAMETERS.items()}
    for src in sources:
        for name, value in src.items():
            if name.startswith(_IGNORED_PREFIXES):
                continue
            if name not in HYPERPARAMETERS:
                raise ConfigError(
                    f"unknown hyperparameter {name!r}; known: {', '.join(sorted(HYPERPARAMETERS))}"
                )
            raw[name] = _unquote(value)
    values: dict[str, Any] = {}
    for name, hp in HYPERPARAMETERS.items():
        try:
            v = hp.kind.parse(raw[name])
        except (ValueError, TypeError) as e:
            reason = str(e) if str(e).startswith("expected") else hp.kind.hint
            raise ConfigError(f"hyperparameter {name}={raw[name]!r} is invalid: {reason}") from None
        if not hp.check(v):
            raise ConfigError(f"hyperparameter {name}={raw[name]!r} is invalid: {hp.check_msg}")
        values[name] = v
    return Config(**values)


@dataclass(frozen=True)
class Paths:
    """Where the job reads and writes (see the module docstring for the overrides)."""

    base: Path
    model_dir: Path
    output_dir: Path
    output_data_dir: Path
    config_dir: Path
    checkpoint_dir: Path
    data_dir: Path
    env: Mapping[str, str]

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    def channel(self, name: str) -> Path | None:
        """Directory of channel ``name`` if it exists."""
        override = self.env.get(f"SM_CHANNEL_{name.upper()}")
        path = Path(override) if override else self.data_dir / name
        return path if path.is_dir() else None


def resolve_paths(env: Mapping[str, str] | None = None) -> Paths:
    """Job paths from the environment (never fails, so the failure file can always be written)."""
    env = dict(os.environ if env is None else env)
    base = Path(env.get("SM_BASE_DIR") or "/opt/ml")

    def pick(var: str, default: Path) -> Path:
        v = env.get(var)
        return Path(v) if v else default

    return Paths(
        base=base,
        model_dir=pick("SM_MODEL_DIR", base / "model"),
        output_dir=pick("SM_OUTPUT_DIR", base / "output"),
        output_data_dir=pick("SM_OUTPUT_DATA_DIR", base / "output" / "data"),
        config_dir=pick("SM_INPUT_CONFIG_DIR", base / "input" / "config"),
        checkpoint_dir=pick("SM_CHECKPOINT_DIR", base / "checkpoints"),
        data_dir=base / "input" / "data",
        env=env,
    )


def read_hyperparameter_file(paths: Paths) -> dict[str, Any]:
    """``hyperparameters.json`` (absent means no hyperparameters)."""
    path = paths.config_dir / "hyperparameters.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text() or "{}")
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return doc


def read_sm_hps(env: Mapping[str, str]) -> dict[str, Any]:
    """The ``SM_HPS`` JSON object, if set."""
    text = env.get("SM_HPS")
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"SM_HPS is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError("SM_HPS must be a JSON object")
    return doc


@dataclass(frozen=True)
class Cluster:
    """Hosts and GPUs of the job."""

    hosts: tuple[str, ...]
    current_host: str
    num_gpus: int

    @property
    def world_size(self) -> int:
        return len(self.hosts) * max(self.num_gpus, 1)


def resolve_cluster(paths: Paths, cuda_devices: Callable[[], int]) -> Cluster:
    """Hosts from ``SM_HOSTS``/``SM_CURRENT_HOST`` or resourceconfig.json; GPUs from ``SM_NUM_GPUS`` or torch."""
    env = paths.env
    resource: dict[str, Any] = {}
    rc = paths.config_dir / "resourceconfig.json"
    if rc.is_file():
        try:
            resource = json.loads(rc.read_text())
        except ValueError as e:
            raise ConfigError(f"{rc} is not valid JSON: {e}") from None
    try:
        hosts = json.loads(env["SM_HOSTS"]) if env.get("SM_HOSTS") else resource.get("hosts", ["algo-1"])
    except ValueError as e:
        raise ConfigError(f"SM_HOSTS is not a JSON list: {e}") from None
    if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
        raise ConfigError("SM_HOSTS must be a non-empty JSON list of host names")
    current = env.get("SM_CURRENT_HOST") or resource.get("current_host") or hosts[0]
    if current not in hosts:
        raise ConfigError(f"current host {current!r} is not in hosts {hosts}")
    if env.get("SM_NUM_GPUS"):
        try:
            num_gpus = int(env["SM_NUM_GPUS"])
        except ValueError:
            raise ConfigError(f"SM_NUM_GPUS={env['SM_NUM_GPUS']!r} is not an integer") from None
    else:
        num_gpus = cuda_devices()
    return Cluster(hosts=tuple(sorted(hosts)), current_host=current, num_gpus=max(num_gpus, 0))
