"""Fetch ImageNet weights into the torch hub cache at image build time, and check them offline.

    python training_image/fetch_weights.py download   # torchvision weights of every architecture
    python training_image/fetch_weights.py verify     # build_model() finds weights for each, without network

``verify`` makes a missing file fail the build instead of a job silently training from random initialisation.
"""

from __future__ import annotations

import sys

from lesionml.archs import ARCHITECTURES, TORCHVISION_ARCHS


def download() -> int:
    """Download every torchvision architecture's default weights (hash-checked) into ``$TORCH_HOME/hub``."""
    from torchvision.models import get_model_weights

    for arch in TORCHVISION_ARCHS:
        weights = get_model_weights(arch).DEFAULT
        weights.get_state_dict(progress=False, check_hash=True)
        print(f"{arch}: {weights}", flush=True)
    return 0


def verify() -> int:
    """Build every architecture with ``pretrained=True`` and check that real weights were found."""
    from lesionml.models import build_model

    missing = []
    for arch in ARCHITECTURES:
        _, info = build_model(arch, 7, pretrained=True, image_size=(150, 200))
        if not info.weights.startswith("imagenet:"):
            missing.append(arch)
    if missing:
        print(f"no pretrained weights for {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"pretrained weights ready for {len(ARCHITECTURES)} architectures", flush=True)
    return 0


def main(argv: list[str]) -> int:
    """Dispatch ``download`` or ``verify``."""
    commands = {"download": download, "verify": verify}
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: fetch_weights.py {{{','.join(commands)}}}", file=sys.stderr)
        return 2
    return commands[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
