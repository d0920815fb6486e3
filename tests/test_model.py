"""The numbers the tutorial's comments state are the numbers the code produces."""
import inspect
import re

import numpy as np

LAYER_COMMENT = re.compile(r"# -> \(([\d, ]*)\), params (?:([\d*+ ]+) = )?([\d,]+)")


def test_layer_comments_state_true_shapes_and_parameter_counts(tutorial):
    source = inspect.getsource(tutorial.build_model)
    comments = LAYER_COMMENT.findall(source)
    model = tutorial.build_model()
    assert len(comments) == len(model.layers) == 14
    for layer, (shape, arithmetic, count) in zip(model.layers, comments):
        stated_shape = tuple(int(n) for n in shape.replace(" ", "").split(",") if n)
        assert tuple(layer.output.shape[1:]) == stated_shape, layer.name
        assert layer.count_params() == int(count.replace(",", "")), layer.name
        if arithmetic:  # the explained arithmetic adds up, too
            assert eval(arithmetic, {"__builtins__": {}}) == int(count.replace(",", "")), \
                layer.name
    total = re.search(r"Total params ([\d,]+): ([\d,]+) trainable, ([\d,]+) non-trainable",
                      source)
    numbers = [int(n.replace(",", "")) for n in total.groups()]
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert numbers == [model.count_params(), trainable, model.count_params() - trainable]


def test_layer_order_is_the_taught_architecture(tutorial):
    model = tutorial.build_model()
    assert [layer.name for layer in model.layers] == [
        "conv1", "bn1", "pool1", "conv2", "bn2", "pool2", "conv3", "bn3", "flatten",
        "dense1", "dropout1", "dense2", "dropout2", "output"]
    assert [model.get_layer(n).rate for n in ("dropout1", "dropout2")] == [0.5, 0.3]
    assert model.get_layer("output").activation.__name__ == "softmax"


def test_split_shapes_stated_in_the_tutorial(tutorial):
    labels = np.repeat(np.arange(10), 6000)
    images = np.zeros((60000, 28, 28), np.uint8)
    (train_x, _), (val_x, _) = tutorial.split_train_validation(images, labels, 0.1, None, 1)
    assert tutorial.preprocess_images(train_x).shape == (54000, 28, 28, 1)
    assert tutorial.preprocess_images(val_x).shape == (6000, 28, 28, 1)
    assert "train (54000, 28, 28, 1), validation (6000, 28, 28, 1)" in \
        inspect.getsource(tutorial)


def test_balanced_subset_has_equal_classes(tutorial):
    labels = np.repeat(np.arange(10), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    chosen = tutorial.balanced_subset_indices(labels, 1005, np.random.default_rng(0))
    assert len(set(chosen)) == 1005
    assert sorted(np.bincount(labels[chosen])) == [100] * 5 + [101] * 5


def test_batchnorm_momentum_adapts_to_run_length(tutorial):
    assert abs(tutorial.batchnorm_momentum_for(43) - 0.767) < 1e-3  # --quick: 43 steps
    assert tutorial.batchnorm_momentum_for(4220) == 0.99    # default: 10 epochs of 422 steps
    assert abs(tutorial.batchnorm_momentum_for(422) - 0.976) < 1e-3  # one full epoch
    assert tutorial.batchnorm_momentum_for(5) == 0.5


def test_learning_rate_warms_up_then_decays_to_zero(tutorial):
    schedule = tutorial.make_learning_rate_schedule(1000, 3e-3, 0.1)
    rates = [float(schedule(step)) for step in (0, 50, 100, 550, 999)]
    assert rates[0] < rates[1] < rates[2] == max(rates)
    assert abs(rates[2] - 3e-3) < 1e-9 and rates[4] < 1e-6
