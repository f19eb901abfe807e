"""Command-line tools for people operating the pipeline."""
