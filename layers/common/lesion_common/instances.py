"""Facts about SageMaker instance types that decide which request fields SageMaker accepts.

SageMaker rejects a customer KMS key for the storage volume (``ResourceConfig.VolumeKmsKeyId`` in
CreateTrainingJob, ``KmsKeyId`` in CreateEndpointConfig) when the instance has local NVMe instance storage:
no EBS volume is attached there, and the instance store is encrypted by the instance's hardware module
(botocore's sagemaker service model, documentation of ``ResourceConfig.VolumeKmsKeyId`` and
``CreateEndpointConfigInput.KmsKeyId``; the family list follows the EC2 "Instance store volumes" table,
https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/InstanceStorage.html#instance-store-volumes).
"""

from __future__ import annotations

import re

# Families offered by SageMaker (training or hosting) whose every size has NVMe instance storage, although the
# family name carries no "d" attribute letter.
_NVME_WITHOUT_D = frozenset(
    {
        "g5",
        "g6",
        "g6e",
        "g7e",
        "gr6",
        "p5",
        "p5e",
        "p5en",
        "p6-b200",
        "p6-b300",
        "p6e-gb200",
        "trn1",
        "trn1n",
        "trn2",
        "dl1",
    }
)

# Families SageMaker offers that are EBS-only (checked against botocore's TrainingInstanceType and
# ProductionVariantInstanceType enums by the unit tests, so a family added there needs a decision here).
EBS_ONLY_FAMILIES = frozenset(
    {
        "t2",
        "t3",
        "m4",
        "m5",
        "m6i",
        "m6g",
        "m7i",
        "m8g",
        "c4",
        "c5",
        "c5n",
        "c6i",
        "c6in",
        "c6g",
        "c6gn",
        "c7i",
        "c7g",
        "c8g",
        "r5",
        "r6i",
        "r6g",
        "r7i",
        "r8g",
        "p2",
        "p3",
        "inf1",
        "inf2",
    }
)

# The SageMaker SDK's names for "on this machine" (samconfig's local environment uses them): no instance storage.
LOCAL_MODE_TYPES = frozenset({"local", "local_gpu"})

# A family is letters, a generation number and attribute letters (then, for some, a "-variant" suffix); "d" among
# the attribute letters means local NVMe storage (c5d, m6gd, r7gd, p3dn, g4dn, p4d, p4de, ...).
_FAMILY = re.compile(r"^(?P<series>[a-z]+)(?P<generation>\d+)(?P<attributes>[a-z]*)(?P<variant>-[a-z0-9]+)?$")


def instance_family(instance_type: str) -> str:
    """Return the family of a SageMaker instance type.

    Parameters
    ----------
    instance_type : str
        E.g. ``ml.g5.xlarge`` (the ``ml.`` prefix is optional).

    Returns
    -------
    str
        E.g. ``g5``.

    Raises
    ------
    ValueError
        If the string is not ``[ml.]family.size``.
    """
    parts = instance_type.strip().lower().split(".")
    if len(parts) == 3 and parts[0] == "ml":
        parts = parts[1:]
    if len(parts) != 2 or not _FAMILY.match(parts[0]):
        raise ValueError(f"not a SageMaker instance type: {instance_type!r}")
    return parts[0]


def has_local_nvme(instance_type: str) -> bool:
    """Tell whether an instance type has local NVMe instance storage (and so must not be given a volume KMS key).

    Parameters
    ----------
    instance_type : str
        E.g. ``ml.g5.xlarge``.

    Returns
    -------
    bool
        True for families such as g4dn, g5, g6, g6e, p4d, p5, trn1, c5d, m5d, r5d; False for EBS-only families
        and for local mode's ``local``/``local_gpu``.

    Raises
    ------
    ValueError
        If the string is not an instance type.
    """
    if instance_type in LOCAL_MODE_TYPES:
        return False
    family = instance_family(instance_type)
    if family in _NVME_WITHOUT_D:
        return True
    if family in EBS_ONLY_FAMILIES:
        return False
    match = _FAMILY.match(family)
    assert match is not None  # instance_family validated it
    return "d" in match.group("attributes")

