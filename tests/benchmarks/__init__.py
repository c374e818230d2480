"""The benchmark suite of issue 5: throughput, client cost and memory of batchrun against baselines."""
