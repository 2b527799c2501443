"""Typed configuration: frozen dataclasses (``sections``), built from YAML files and
``key=value`` overrides (``loading``). Every default lives in ``sections``, every field is
validated there, and nothing changes a config after it is built.

    cfg = load_config("examples/tiny/sft.yaml", ["train.lr=3e-4"], stage="sft")
"""

from .loading import apply_override, config_from_dict, dump_config, load_config, model_from_checkpoint
from .sections import (
    ARCHITECTURE_FIELDS,
    Config,
    ConfigError,
    DataConfig,
    DPOConfig,
    ModelConfig,
    ParallelConfig,
    PPOConfig,
    RMConfig,
    TrainConfig,
)

__all__ = [
    "ARCHITECTURE_FIELDS", "Config", "ConfigError", "DPOConfig", "DataConfig", "ModelConfig", "PPOConfig", "ParallelConfig",
    "RMConfig", "TrainConfig", "apply_override", "config_from_dict", "dump_config", "load_config", "model_from_checkpoint",
]
