"""Copy-detection benchmark, metrics, baselines and the report: how much the STN embedder is worth, in numbers."""
