"""pimoe.adapt: meta-learning (MAML, FOMAML, Reptile, ProtoNets), continual learning (EWC, replay),
learning-rate adaptation (hypergradient descent) and few-shot tasks (sinusoids, digits episodes)."""

from pimoe.adapt.backbones import ConvNet
from pimoe.adapt.continual import (
    EWC,
    ReplayBuffer,
    fisher_diagonal,
    task_incremental_loss,
    train_task,
)
from pimoe.adapt.functional import run, sgd_steps, trainable_params
from pimoe.adapt.learner import AdaptConfig, AdaptiveLearning
from pimoe.adapt.lr import HypergradientLR
from pimoe.adapt.maml import MAML
from pimoe.adapt.protonet import ProtoNet
from pimoe.adapt.reptile import Reptile
from pimoe.adapt.tasks import DigitsEpisodes, SinusoidTasks, Task, load_digits_tensors

__all__ = [
    "EWC",
    "MAML",
    "AdaptConfig",
    "AdaptiveLearning",
    "ConvNet",
    "DigitsEpisodes",
    "HypergradientLR",
    "ProtoNet",
    "ReplayBuffer",
    "Reptile",
    "SinusoidTasks",
    "Task",
    "fisher_diagonal",
    "load_digits_tensors",
    "run",
    "sgd_steps",
    "task_incremental_loss",
    "train_task",
    "trainable_params",
]
