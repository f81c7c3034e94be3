"""pudl: positive-unlabeled RL distillation of small models, offline, on one machine."""

__version__ = "0.1.0"
