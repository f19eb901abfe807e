"""Shared model package for skin-lesion classification: labels, models, preprocessing, metrics, drift reference.

Submodules are imported explicitly; ``labels``, ``archs``, ``metrics``, ``preprocessing`` and ``reference_stats``
do not import torch, ``models`` does.
"""

__version__ = "0.1.0"
