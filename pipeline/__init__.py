"""The product surface: CLI, configs, datasets, shard schema and I/O, the Ray label service, round
orchestration, evaluation and reports."""
