"""fastmaml: fast, batched Model-Agnostic Meta-Learning for any ``torch.nn.Module``."""
from .core import MAML, multi_step_loss_weights
from .errors import (ConfigError, DataError, FastMAMLError, NonFiniteInputError, NonFiniteLossError,
                     ShapeError)
from .inner_lr import InnerLearningRates
from .inputs import TaskBatch, as_task_batch
from . import models
from .adaptation import AdaptedPolicy, TrainedPolicy, TrainedRun, load_run, meta_train
from .train import TrainingStopped

__all__ = ["models", "meta_train", "TrainingStopped", "load_run", "TrainedRun", "TrainedPolicy", "AdaptedPolicy", "MAML", "TaskBatch", "as_task_batch", "multi_step_loss_weights", "InnerLearningRates",
           "FastMAMLError", "ConfigError", "DataError", "ShapeError", "NonFiniteLossError",
           "NonFiniteInputError"]
__version__ = "0.1.0"
