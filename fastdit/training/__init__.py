"""Training: configuration, the distributed trainer, EMA, checkpoints, LR schedules and metrics.

Generic over the model and the objective: a model with a ``blocks`` ModuleList (for per-block compile,
checkpointing and FSDP2 sharding), a ``TrainTask`` with ``loss(model, batch)``, and a
``fastdit.data.StatefulDataset``.
"""
from fastdit.training.checkpoint import (CheckpointError, CheckpointManager, CheckpointWriteError, load_state,
                                         load_weights, resolve_checkpoint, save_safetensors, validate_checkpoint)
from fastdit.training.config import (CheckpointConfig, ConfigError, DataConfig, EMAConfig, LoggingConfig,
                                     ModelConfig, OptimConfig, RunConfig, ScheduleConfig, TaskConfig,
                                     TrainConfig)
from fastdit.training.ema import EMA
from fastdit.training.metrics import make_grid, read_jsonl, save_image_grid
from fastdit.training.schedule import build_scheduler, lr_factor
from fastdit.training.task import TrainTask
from fastdit.training.trainer import (NonFiniteError, Trainer, compile_blocks, enable_gradient_checkpointing,
                                      model_blocks)

__all__ = [
    "TrainConfig", "RunConfig", "ModelConfig", "TaskConfig", "DataConfig", "OptimConfig", "ScheduleConfig",
    "EMAConfig", "CheckpointConfig", "LoggingConfig", "ConfigError",
    "Trainer", "NonFiniteError", "TrainTask", "EMA", "CheckpointManager", "load_state", "resolve_checkpoint",
    "save_safetensors", "CheckpointError", "CheckpointWriteError", "validate_checkpoint", "load_weights", "build_scheduler", "lr_factor", "make_grid", "save_image_grid", "read_jsonl",
    "compile_blocks", "enable_gradient_checkpointing", "model_blocks",
]
