"""The error the training library raises for a run that cannot start or go on (bad data, label, config, checkpoint).

A `ValueError`, so notebook and `Trainer` users can catch it; `train.py`'s `main()` alone turns it into an exit
message (no traceback)."""


class TrainingSetupError(ValueError):
    """What is wrong with the run's inputs, in a sentence the user can act on."""


__all__ = ["TrainingSetupError"]
