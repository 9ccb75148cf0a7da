"""Training machinery shared by the experiments.

Config CLI, checkpoints, metrics, plots, the training loop and data-parallel / FSDP
sharding (`DataParallel`):

```python
from experiments.common import (
    LoopSpec, TrainState, adamw_cosine, config_to_dict, parse_config, plot_metrics,
    train_loop,
)
```
"""

from .checkpoint import (
    CheckpointManager as CheckpointManager,
    load_checkpoint as load_checkpoint,
    read_header as read_header,
    save_checkpoint as save_checkpoint,
)
from .config import (
    config_from_dict as config_from_dict,
    config_to_dict as config_to_dict,
    format_config as format_config,
    parse_config as parse_config,
)
from .loop import (
    LoopSpec as LoopSpec,
    NonFiniteLossError as NonFiniteLossError,
    train_loop as train_loop,
    TrainState as TrainState,
)
from .metrics import MetricsLogger as MetricsLogger, read_metrics as read_metrics
from .optim import (
    adamw_cosine as adamw_cosine,
    count_params as count_params,
    warmup_cosine as warmup_cosine,
)
from .plotting import plot_metrics as plot_metrics, plot_series as plot_series
from .sharding import (
    batch_sharding as batch_sharding,
    DataParallel as DataParallel,
    fsdp_shardings as fsdp_shardings,
    initialize_distributed as initialize_distributed,
    make_mesh as make_mesh,
    replicate as replicate,
    replicated_sharding as replicated_sharding,
    shard_batch as shard_batch,
    ShardingError as ShardingError,
    state_shardings as state_shardings,
)
