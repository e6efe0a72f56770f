"""Dataset adapters: samples with stable ids ``<shard>/<row>``, labels, and on-disk shards."""
