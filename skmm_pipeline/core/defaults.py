"""Defaults shared by the settings resource, the demo, the CLI and the benchmark asset: stated once here."""

SEED = 0
BUDGET = 40  # samples selected per version
SKETCH_DIM = 128  # m of the gradient sketch
DEMO_SHARDS = 3  # shards the embedded pool lands in
BENCHMARK_SEEDS = 5
BENCHMARK_BUDGETS = (10, 20, 40, 80, 160)
