"""Model monitoring for the skin-lesion pipeline: drift of captured predictions and quality from ground truth.

Only NumPy and the standard library, so the Lambda layer stays small (docs/contracts.md, "Monitoring record").
"""

__all__ = ["cloudwatch", "drift", "quality", "records", "reference", "stats"]
