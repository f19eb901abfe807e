"""Print the ``sam deploy`` arguments ``make deploy`` uses: ``--guided`` the first time, and the image URIs.

The first deployment is guided (SAM asks for the e-mail, VPC and the rest, and saves the answers in
samconfig.toml) when the chosen samconfig environment has no ``TrainingImageUri`` yet. The URIs that
``make images`` wrote to ``.aws-sam/images.env`` are added to the environment's own ``parameter_overrides``
(a ``--parameter-overrides`` on the command line replaces them rather than adding to them). Stdlib only: it runs
before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import shlex
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def deploy_args(samconfig: Path, images_env: Path, environment: str = "default") -> list[str]:
    """Arguments for ``sam deploy`` after ``--config-env``."""
    config = tomllib.loads(samconfig.read_text()) if samconfig.exists() else {}
    raw = config.get(environment, {}).get("deploy", {}).get("parameters", {}).get("parameter_overrides", [])
    overrides = list(raw) if isinstance(raw, list) else shlex.split(raw)
    keys = {item.split("=", 1)[0] for item in overrides}
    images = {}
    if images_env.exists():
        images = dict(line.split("=", 1) for line in images_env.read_text().split() if "=" in line)
    args = [] if "TrainingImageUri" in keys else ["--guided"]
    if images:
        merged = [o for o in overrides if o.split("=", 1)[0] not in images]
        merged += [f"{k}={v}" for k, v in sorted(images.items())]
        args += ["--parameter-overrides", *merged]
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: the arguments, shell-quoted, on one line."""
    parser = argparse.ArgumentParser(prog="python -m tools.deploy_args", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-env", default="default", help="samconfig.toml environment (default: default)")
    parser.add_argument("--images", type=Path, default=REPO / ".aws-sam" / "images.env",
                        help="KEY=URI lines written by `make images` (default: .aws-sam/images.env)")
    args = parser.parse_args(argv)
    print(shlex.join(deploy_args(REPO / "samconfig.toml", args.images, args.config_env)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
