"""Defaults shared by the settings resource, the demo, the CLI and the benchmark asset: stated once here."""

SEED = 0
BUDGET = 40  # samples selected per version
SKETCH_DIM = 128  # m of the gradient sketch
# Label-free FT-2 and deeper: a deep block's gradient is taken along at most this many class-space
# directions (a seeded sketch of the class space when the model has more classes; None: all, exact).
CLASS_PROBES = 16
DEMO_SHARDS = 3  # shards the embedded pool lands in
BENCHMARK_SEEDS = 5
BENCHMARK_BUDGETS = (10, 20, 40, 80, 160)
# selection_mode "auto" selects composably (per-shard candidates, one merge) once the joined sketch
# (rows x sketch_dim float32) would exceed this many bytes, and globally below it (the demo's pool is
# ~550 rows x 128: about 0.3 MB).
COMPOSABLE_ABOVE_BYTES = 2 << 30
