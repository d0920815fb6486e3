"""The numbers the tutorial's comments state are the numbers the code produces."""
import inspect
import json
import os
import re

import numpy as np
import pytest

LAYER_COMMENT = re.compile(r"# (\w+) -> \(([\d, ]*)\), params (?:([\d*+ ]+) = )?([\d,]+)")


def test_layer_comments_state_true_shapes_and_parameter_counts(tutorial):
    source = inspect.getsource(tutorial.build_model)
    comments = LAYER_COMMENT.findall(source)
    model = tutorial.build_model()
    assert len(comments) == len(model.layers) == 14
    for layer, (name, shape, arithmetic, count) in zip(model.layers, comments):
        assert layer.name == name
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
    """The values section 8 states: 0.767 for 43 steps, 0.976 for one epoch of 422 (--quick),
    0.99 (capped; the rule alone gives 0.9976) for the default 4,220, about 100 steps' memory."""
    assert abs(tutorial.batchnorm_momentum_for(43) - 0.767) < 1e-3
    assert abs(tutorial.batchnorm_momentum_for(422) - 0.976) < 1e-3
    assert tutorial.batchnorm_momentum_for(4220) == 0.99
    assert round(1 - 10 / 4220, 4) == 0.9976
    assert round(1 / (1 - tutorial.batchnorm_momentum_for(4220))) == 100
    assert tutorial.batchnorm_momentum_for(5) == 0.5


def test_steps_per_epoch_stated_in_the_lesson(tutorial):
    """54,000 images / 128 = 422 steps (the last batch has 112 images), 4,220 in 10 epochs;
    and one epoch on 5,400 images: 43 steps (section 8)."""
    import math
    batch_size, epochs = tutorial.SETTINGS["batch_size"][0], tutorial.SETTINGS["epochs"][0]
    assert math.ceil(54_000 / batch_size) == 422 and 54_000 - 421 * batch_size == 112
    assert 422 * epochs == 4220
    assert math.ceil(5_400 / batch_size) == 43


def test_parameter_counts_for_both_paddings(tutorial):
    """valid: 250,058 (147,584 in dense1); same: 905,418, of which 802,944 in dense1."""
    valid, same = tutorial.build_model(), tutorial.build_model(padding="same")
    assert valid.count_params() == 250_058
    assert valid.get_layer("dense1").count_params() == 147_584
    assert round(147_584 / 250_058, 2) == 0.59
    assert same.count_params() == 905_418
    assert same.get_layer("dense1").count_params() == 802_944 == 7 * 7 * 128 * 128 + 128
    assert tuple(same.get_layer("conv3").output.shape[1:]) == (7, 7, 128)


def test_receptive_fields_stated_in_the_lesson(tutorial):
    """3x3 after conv1, 4 after pool1, 8 after conv2, 10 after pool2, 18 after conv3."""
    size, jump, fields = 1, 1, {}
    for layer in tutorial.build_model().layers:
        kernel = getattr(layer, "kernel_size", None) or getattr(layer, "pool_size", None)
        if kernel:
            size += (kernel[0] - 1) * jump
            jump *= layer.strides[0]
            fields[layer.name] = size
    assert fields == {"conv1": 3, "pool1": 4, "conv2": 8, "pool2": 10, "conv3": 18}


def test_softmax_and_cross_entropy_examples(tutorial):
    import math
    logits = np.array([2.0, 1.0, 0.1])
    probabilities = np.exp(logits) / np.exp(logits).sum()
    assert [round(p, 2) for p in probabilities] == [0.66, 0.24, 0.10]
    assert [round(-math.log(p), 3) for p in (0.9, 0.5, 0.1)] == [0.105, 0.693, 2.303]
    assert round(math.log(10), 2) == 2.30


def augmentation_layer(tutorial, degrees=8, shift=2, zoom=0.1, seed=0):
    return tutorial.RandomShiftRotateZoom(degrees, shift, zoom, seed=seed)


def test_augmentation_layer_moves_pixels_only_in_training(tutorial):
    import keras
    image = np.zeros((16, 28, 28, 1), np.float32)
    image[:, 10:18, 13:15, 0] = 1.0  # a vertical bar
    layer = augmentation_layer(tutorial)
    assert np.array_equal(keras.ops.convert_to_numpy(layer(image)), image)  # test time
    moved = keras.ops.convert_to_numpy(layer(image, training=True))
    assert moved.shape == (16, 28, 28, 1) and moved.dtype == np.float32
    assert -1e-6 <= moved.min() and moved.max() <= 1 + 1e-6
    assert not np.allclose(moved, image)
    assert len({m.tobytes() for m in moved}) == 16  # a different draw for every image
    assert np.allclose(moved.sum(axis=(1, 2, 3)), image[0].sum(), rtol=0.25)  # ink is kept
    still = augmentation_layer(tutorial, 0, 0, 0)(image, training=True)
    assert np.allclose(keras.ops.convert_to_numpy(still), image, atol=1e-5)  # all off: no change


def test_augmentation_transform_shifts_rotates_and_zooms_as_stated(tutorial):
    """A zoom factor of 1.25 makes an 8x8 square of ink 10x10; a shift of 2 moves it 2 pixels
    right; a rotation of 90 degrees turns a horizontal bar vertical."""
    import keras
    square = np.zeros((1, 28, 28, 1), np.float32)
    square[0, 10:18, 10:18] = 1.0

    def transform(image, angle=0.0, zoom=1.0, shift_x=0.0, shift_y=0.0):
        rows = tutorial.shift_rotate_zoom_transforms(
            *(np.array([value], np.float32) for value in (angle, zoom, shift_x, shift_y)), 28)
        return keras.ops.convert_to_numpy(keras.ops.image.affine_transform(
            image, rows, interpolation="bilinear", fill_mode="constant"))
    assert (transform(square, zoom=1.25) > 0.5).sum() == 100
    moved = transform(square, shift_x=2.0)
    assert np.array_equal(moved[0, 10:18, 12:20, 0] > 0.5, np.ones((8, 8), bool))
    bar = np.zeros((1, 28, 28, 1), np.float32)
    bar[0, 13:15, 6:22] = 1.0
    turned = transform(bar, angle=np.pi / 2)[0, :, :, 0] > 0.5
    rows, cols = np.nonzero(turned)
    assert np.ptp(rows) > 12 and np.ptp(cols) < 3


def test_zoom_keeps_the_ink_area_within_the_stated_range(tutorial):
    import keras
    square = np.zeros((64, 28, 28, 1), np.float32)
    square[:, 10:18, 10:18] = 1.0
    zoom = tutorial.SETTINGS["max_zoom"][0]
    layer = augmentation_layer(tutorial, 0, 0, zoom, seed=1)
    areas = keras.ops.convert_to_numpy(layer(square, training=True)).sum(axis=(1, 2, 3)) / 64
    assert 0.81 - 0.02 <= areas.min() < 0.95 and 1.05 < areas.max() <= 1.21 + 0.02


def test_saved_network_has_no_augmentation_layer_and_loads_in_safe_mode(tutorial, quick_run,
                                                                         tmp_path):
    """The file the tutorial saves loads with plain keras (TensorFlow) in a fresh Python with
    none of our code (no custom classes), safe mode on, and scores what the run reported."""
    import subprocess
    import sys
    from conftest import DATA_DIR
    _, output_dir, metrics = quick_run
    _, _, x_test, y_test = tutorial.load_mnist(DATA_DIR or "")[0]
    np.save(tmp_path / "x_test.npy", tutorial.preprocess_images(x_test))
    program = ("import json, keras, numpy as np; m = keras.saving.load_model(%r, safe_mode=True);"
               " p = m.predict(np.load(%r), verbose=0); print(json.dumps([m.count_params(), "
               "[type(l).__module__.split('.')[0] for l in m.layers], p.argmax(1).tolist()]))"
               % (str(output_dir / "mnist_cnn.keras"), str(tmp_path / "x_test.npy")))
    completed = subprocess.run([sys.executable, "-c", program], capture_output=True,
                               text=True, timeout=300,
                               env=dict(os.environ, KERAS_BACKEND="tensorflow"))
    assert completed.returncode == 0, completed.stderr[-2000:]
    count, modules, predictions = json.loads(completed.stdout.strip().splitlines()[-1])
    assert count == 250_058 and set(modules) == {"keras"}
    accuracy = float((np.array(predictions) == y_test).mean())
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-4)


def test_learning_rate_warms_up_then_decays_to_zero(tutorial):
    schedule = tutorial.make_learning_rate_schedule(1000, 3e-3, 0.1)
    rates = [float(schedule(step)) for step in (0, 50, 100, 550, 999)]
    assert rates[0] < rates[1] < rates[2] == max(rates)
    assert abs(rates[2] - 3e-3) < 1e-9 and rates[4] < 1e-6


def test_exercise_variants_build_and_feature_maps_find_their_blocks(tutorial):
    for options, parameters in (({"batchnorm": False}, 250_058 - 4 * 224),
                                ({"pooling": False}, None), ({"dropout": False}, 250_058)):
        model = tutorial.build_model(**options)
        if parameters:
            assert model.count_params() == parameters
        assert len(tutorial.block_outputs(model)) == 3
    no_pool = tutorial.build_model(pooling=False)
    assert no_pool.get_layer("dense1").count_params() == 22 * 22 * 128 * 128 + 128  # 7.9 million
    assert tutorial.block_outputs(tutorial.build_model()) == ["pool1", "pool2", "bn3"]
    assert tutorial.build_dense_model().count_params() == 784 * 128 + 128 + 128 * 64 + 64 + 650


def test_schedule_numbers_stated_in_section_10(tutorial):
    """Warm-up 6e-4 -> 6e-3 over 1,266 steps (3 epochs), 3e-3 at step 2,743, 0 at 4,220."""
    peak, warmup = (tutorial.SETTINGS[name][0] for name in ("peak_learning_rate",
                                                            "warmup_fraction"))
    schedule = tutorial.make_learning_rate_schedule(4220, peak, warmup)
    assert int(4220 * warmup) == 1266 == 3 * 422
    assert abs(float(schedule(0)) - 6e-4) < 1e-9 and abs(float(schedule(1266)) - 6e-3) < 1e-9
    assert 1266 + (4220 - 1266) // 2 == 2743 and abs(float(schedule(2743)) - 3e-3) < 1e-5
    assert float(schedule(4220)) < 1e-9


def test_batchnorm_and_momentum_examples_in_section_8():
    values = np.array([2.0, 4.0, 6.0])
    assert round(values.std(), 2) == 1.63
    assert [round(v, 2) for v in (values - values.mean()) / values.std()] == [-1.22, 0.0, 1.22]
    assert round(0.99 ** 43, 2) == 0.65
    stroke = np.tile([-1.0, 2.0, -1.0], (3, 1))  # the vertical-stroke filter
    line, blank, full = np.tile([0.0, 1.0, 0.0], (3, 1)), np.zeros((3, 3)), np.ones((3, 3))
    assert [(stroke * patch).sum() for patch in (line, blank, full)] == [6.0, 0.0, 0.0]


def test_standard_errors_stated_in_the_lesson():
    assert round(100 * (0.994 * 0.006 / 6000) ** 0.5, 1) == 0.1
    assert round(100 * (0.994 * 0.006 / 10000) ** 0.5, 2) == 0.08


def test_mnist_numbers_stated_in_the_lesson(tutorial):
    """11.35% is the share of 1s in the test set (the lr x10 exercise); the photo pipeline's
    target stroke width is the median over the test digits."""
    from conftest import DATA_DIR
    (_, _, test_images, test_labels), _ = tutorial.load_mnist(DATA_DIR)
    assert np.mean(test_labels == 1) == 0.1135
    widths = [tutorial.stroke_width(image > 127) for image in test_images]
    assert abs(np.median(widths) - tutorial.MNIST_STROKE_WIDTH) < 0.05


def test_label_smoothing_numbers_stated_in_section_10(tutorial):
    """Target 0.91 / 0.01; the lowest possible loss 0.50; a uniform guess still costs ln 10."""
    import keras
    smoothing = tutorial.SETTINGS["label_smoothing"][0]
    target = np.eye(10, dtype=np.float32)[[3]]
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
    smoothed = (1 - smoothing) * target + smoothing / 10
    assert round(smoothed[0, 3], 2) == 0.91 and round(smoothed[0, 0], 2) == 0.01
    assert round(float(loss(target, smoothed)), 2) == 0.50
    assert round(tutorial.lowest_possible_loss(smoothing), 2) == 0.50
    assert round(float(loss(target, np.full((1, 10), 0.1, np.float32))), 2) == 2.30


def test_lowest_possible_loss_is_the_loss_of_the_target_itself(tutorial):
    import keras
    assert tutorial.lowest_possible_loss(0.0) == 0.0
    for smoothing in (0.05, 0.1, 0.3):
        target = (1 - smoothing) * np.eye(10, dtype=np.float32)[[7]] + smoothing / 10
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
        assert abs(float(loss(np.eye(10)[[7]], target)) -
                   tutorial.lowest_possible_loss(smoothing)) < 1e-5


def test_neuron_and_dense_numbers_stated_in_section_6(tutorial):
    """The neuron example, Glorot's limit for 784 -> 4, the dense network's parameters."""
    import math
    assert max(0.0, 0.5 * 2 + 1.0 * -1 + 0.5) == 0.5
    assert round(math.sqrt(6 / (784 + 4)), 3) == 0.087
    dense = tutorial.build_dense_model()
    assert dense.count_params() == 109_386
    assert dense.layers[1].count_params() == 784 * 128 + 128 == 100_480


def test_convolution_by_hand_equals_keras_conv2d(tutorial):
    """Section 7: the NumPy loop is what Keras' Conv2D computes (no flip: cross-correlation),
    the output size is 26, a shifted digit gives a shifted map."""
    import keras
    rng = np.random.default_rng(0)
    image = rng.random((28, 28)).astype(np.float32)
    kernel = rng.normal(size=(3, 3)).astype(np.float32)  # not symmetric: a flip would show
    by_hand = tutorial.convolve(image, kernel)
    conv = keras.layers.Conv2D(1, 3, use_bias=False, dtype="float32")
    conv.build((None, 28, 28, 1))
    conv.set_weights([kernel.reshape(3, 3, 1, 1)])
    by_keras = keras.ops.convert_to_numpy(conv(image[None, :, :, None]))[0, :, :, 0]
    assert by_hand.shape == (26, 26) and np.allclose(by_hand, by_keras, atol=1e-5)
    flipped = tutorial.convolve(image, kernel[::-1, ::-1])
    assert not np.allclose(flipped, by_keras, atol=1e-3)
    assert tutorial.max_pool(by_hand).shape == (13, 13)
    padded = np.zeros((28, 28), np.float32)
    padded[4:24, 4:24] = image[4:24, 4:24]
    shifted = tutorial.convolve(np.roll(padded, 2, axis=1), kernel)
    assert np.allclose(shifted[:, 2:], tutorial.convolve(padded, kernel)[:, :-2], atol=1e-5)


def test_convolution_numbers_stated_in_section_7(tutorial):
    assert 3 * 3 * 32 + 32 == tutorial.build_model().get_layer("conv1").count_params() == 320
    assert 3 * 3 * 32 == 288 and 26 * 26 * 32 == 21_632
    assert 784 * 21_632 + 21_632 == 16_981_120
    assert tutorial.build_model().get_layer("conv2").count_params() == 64 * (288 + 1)
