"""Shared helpers: where the script and the data are, how to run the script, and one quick
training run that the smoke, notebook and --predict tests share (training once keeps the whole
suite to a few minutes on a 2-core CPU)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "cnn_mnist_classifier.py")
sys.path.insert(0, ROOT)


def find_data_dir():
    """MNIST_DATA_DIR, else ../shared/mnist beside the project; None means Keras' cache."""
    candidates = [os.environ.get("MNIST_DATA_DIR"), os.path.join(ROOT, "..", "shared", "mnist")]
    for candidate in candidates:
        if candidate and os.path.isdir(candidate):
            return os.path.abspath(candidate)
    return None


DATA_DIR = find_data_dir()
SHARED_RUNS = ("quick_run", "interrupted_run")  # expensive fixtures that several tests read
DATA_ARGS = ["--data-dir", DATA_DIR] if DATA_DIR else []

EXPECTED_FIGURES = [
    "01_sample_images.png", "02_class_distribution.png", "03_preprocessing.png",
    "04_convolution_by_hand.png", "05_augmentation.png", "06_training_history.png",
    "07_overfitting.png", "08_confusion_matrix.png", "09_predictions.png", "10_confidence.png",
    "11_filters.png", "12_feature_maps.png", "13_occlusion.png", "14_mistakes.png",
    "15_your_digit_recipe.png",
]
METRIC_KEYS = [
    "test_accuracy", "test_loss", "dense_test_accuracy", "untrained_loss", "best_val_accuracy", "best_epoch", "epochs",
    "training_seconds", "parameters", "backend", "device", "precision", "jit_compile",
    "keras_version", "backend_version", "python_version", "seed", "data_source",
    "peak_memory_mb", "reload_largest_difference",
]


def script_env(env_overrides=None):
    env = dict(os.environ)
    env.update(env_overrides or {})
    return {key: value for key, value in env.items() if value is not None}


def run_script(args, env_overrides=None, timeout=600, cwd=None):
    """Run the tutorial as a user would; return the CompletedProcess (text output).
    An override of None removes that variable."""
    env = script_env(env_overrides)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd or ROOT)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One real `--quick` run on real MNIST: (completed process, output folder, metrics)."""
    output_dir = tmp_path_factory.mktemp("quick_outputs")
    completed = run_script(["--quick", "--no-show", "--output-dir", str(output_dir), *DATA_ARGS])
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    with open(output_dir / "metrics.json", encoding="utf-8") as handle:
        metrics = json.load(handle)
    return completed, output_dir, metrics


@pytest.fixture(scope="session")
def tutorial():
    """The script's definitions (helpers, constants), without running the lesson: loaded by
    the tutorial's own load_definitions, as --predict does."""
    from benchmark import load_tutorial
    return load_tutorial()


@pytest.fixture(scope="session")
def small_mnist(tmp_path_factory, tutorial):
    """--data-dir for the short runs: real MNIST, cut to 3,000 training and 500 test images and
    saved as float32 in [0, 1], as home-made mnist.npz files often are. Small keeps their
    evaluation quick; float tests the exact scaling back to 0-255 end to end."""
    (x_train, y_train, x_test, y_test), _ = tutorial.load_mnist(DATA_DIR or "")
    folder = tmp_path_factory.mktemp("small_mnist")
    np.savez(folder / "mnist.npz", x_train=x_train[:3000].astype(np.float32) / 255,
             y_train=y_train[:3000], x_test=x_test[:500].astype(np.float32) / 255,
             y_test=y_test[:500])
    return ["--data-dir", str(folder)]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own
def pytest_cmdline_main(config):
    """Two test workers at once (pytest-xdist), unless -n says otherwise: the suite's runs are
    often single-threaded (imports, tracing, figures), so on a 2-core machine two at a time
    finish sooner. Set here because the project has no pytest.ini."""
    if getattr(config.option, "numprocesses", 0) is None and not hasattr(config, "workerinput"):
        config.option.numprocesses = 2
        config.option.dist = "loadgroup"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """With several workers, the tests that read one shared run go to the same worker, so
    that the run happens once."""
    for item in items:
        for fixture in SHARED_RUNS:
            if fixture in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(fixture))
                break
