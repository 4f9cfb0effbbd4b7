"""Keras 3 optimizers and learning-rate schedules of the classifier configs (Model Garden's
`official.modeling.optimization` builds tf_keras ones, which a Keras 3 model cannot use)."""

from __future__ import annotations

import keras

from melanoma_tf.configs import classification as configs


def learning_rate_schedule(opt: configs.OptimizerConfig, steps_per_epoch: int,
                           epochs: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warmup, then constant or cosine decay reaching 0 exactly after the last epoch."""
    warmup = round(opt.warmup_epochs * steps_per_epoch)
    decay = max(epochs * steps_per_epoch - warmup, 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else opt.learning_rate, decay_steps=decay,
        alpha=1.0 if opt.schedule == "constant" else 0.0,
        warmup_target=opt.learning_rate if warmup else None, warmup_steps=warmup)


def build_optimizer(opt: configs.OptimizerConfig, steps_per_epoch: int, epochs: int) -> keras.optimizers.Optimizer:
    """SGD with momentum or AdamW on `learning_rate_schedule`."""
    common = dict(learning_rate=learning_rate_schedule(opt, steps_per_epoch, epochs),
                  weight_decay=opt.weight_decay or None, clipnorm=opt.clipnorm)
    if opt.type == "sgd":
        optimizer = keras.optimizers.SGD(momentum=opt.momentum, nesterov=opt.nesterov, **common)
    else:
        optimizer = keras.optimizers.AdamW(**common)
    if opt.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])  # not BN scales/offsets
    return optimizer
