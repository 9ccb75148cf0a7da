"""Helpers both experiments share; each training script's loop stays in its `train.py`.

- `config`: `--key=value` overrides of a frozen dataclass, JSON, and `validate` (one table
  of ranges and relations for both experiments);
- `solvers`: config strings -> `revdeq_jax` solvers and adjoints;
- `optim`: the optimiser (AdamW, clipping, schedules) and `TrainState`;
- `run`: a run directory (config.json, checkpoints, metrics) and the training CLI;
- `checkpoint`: checksummed, atomic checkpoints; `metrics`: JSONL; `plotting`: PNG curves;
- `sharding`: data parallel / FSDP over all devices and hosts.
"""
