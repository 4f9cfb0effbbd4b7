"""Every registered classifier profile builds and trains (a few steps); schedules end at the budget."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from official.core import exp_factory

from melanoma_tf.configs import classification as configs
from melanoma_tf.data import synthetic
from melanoma_tf.masking import mask_lesion
from melanoma_tf.modeling import optimization
from melanoma_tf.tasks import melanoma_classification as task

PROFILES = ["melanoma_alexnet_paper", "melanoma_alexnet_tuned", "melanoma_alexnet_modern",
            "melanoma_alexnet_lesion_stats", "melanoma_alexnet_hybrid", "melanoma_efficientnet_lite0",
            "melanoma_efficientnet_lite0_context", "melanoma_sklesion_xception_context"]


def test_every_registered_profile_is_listed_here():
    registered = {name for name in exp_factory._REGISTERED_CONFIGS if name.startswith("melanoma_")}
    assert registered == set(PROFILES)


def test_paper_yaml_writes_out_the_paper_profile():
    """cls_paper.yaml claims to document the profile: every value it sets is the profile's."""
    from_yaml = task.resolve_params(configs.DEFAULT_EXPERIMENT, config_files=["cls_paper.yaml"])
    assert from_yaml.as_dict() == task.resolve_params(configs.DEFAULT_EXPERIMENT).as_dict()


@pytest.fixture(scope="module")
def masked_lesions() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(4):
        rgb, mask = synthetic.render_lesion(rng, melanoma=bool(i % 2), height=160, width=160)
        images.append(np.asarray(mask_lesion(rgb, mask, 227)))
        labels.append(i % 2)
    return np.stack(images), np.array(labels)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_builds_and_trains(name, masked_lesions):
    images, labels = masked_lesions
    params = configs.build_config(name)
    keras.utils.set_random_seed(0)
    model = task.build_model(params, training=True)
    task.adapt_normalization(model, images)  # as `fit` does
    optimizer = optimization.build_optimizer(params.optimizer, steps_per_epoch=1, epochs=params.training.epochs)
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy())
    before = {v.path: np.array(v) for v in model.trainable_variables}
    # Three steps: warmup starts at a learning rate of 0, and a zero-initialised output layer
    # passes no gradient back until it has taken one step itself.
    for _ in range(3):
        loss = model.train_on_batch(images, np.eye(2, dtype=np.float32)[labels])
    assert np.isfinite(loss)
    unchanged = [v.path for v in model.trainable_variables if np.array_equal(before[v.path], np.array(v))]
    assert not unchanged, f"{name}: not trained: {unchanged}"
    assert model.predict(images, verbose=0).shape == (4, 2)


@pytest.mark.parametrize("name", ["melanoma_alexnet_tuned", "melanoma_alexnet_lesion_stats"])
def test_learning_rate_schedule_ends_exactly_at_the_last_epoch(name):
    params = configs.build_config(name)
    steps, epochs = 9, params.training.epochs
    schedule = optimization.learning_rate_schedule(params.optimizer, steps, epochs)
    warmup = round(params.optimizer.warmup_epochs * steps)
    assert float(schedule(warmup)) == pytest.approx(params.optimizer.learning_rate)
    assert float(schedule(steps * epochs - 1)) > 0
    assert float(schedule(steps * epochs)) == pytest.approx(0.0, abs=1e-9)
