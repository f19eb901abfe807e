"""Ingestion at archive scale (issue 16): reads per upload and near-duplicate recall; see RESULTS.md."""
