"""The engine: training, evaluation, prediction, optimisation, checkpoints and distributed runs.

``fusionkit train | eval | predict`` (:mod:`fusionkit.engine.commands`) drive it from a recipe's
``data``, ``train`` and ``eval`` sections (:mod:`fusionkit.engine.config`); see ``docs/engine.md``.
"""

from fusionkit.engine.checkpoint import CheckpointManager, load_model, load_weights
from fusionkit.engine.config import eval_config, train_config
from fusionkit.engine.evaluate import evaluate, run_eval
from fusionkit.engine.optim import build_optimizer, param_groups
from fusionkit.engine.predict import run_predict
from fusionkit.engine.trainer import NonFiniteLossError, Trainer, TrainResult, train

__all__ = ["CheckpointManager", "NonFiniteLossError", "TrainResult", "Trainer", "build_optimizer", "eval_config",
           "evaluate", "load_model", "load_weights", "param_groups", "run_eval", "run_predict", "train",
           "train_config"]
