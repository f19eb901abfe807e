"""Training benchmarks: throughput.py (loop speed) and quality.py (HAM10000 accuracy)."""
