"""Command-line flags: defaults, overrides, notebook arguments, and every bad value."""
import re

import pytest

from conftest import run_script


def parse_error(tutorial, capsys, argv):
    with pytest.raises(SystemExit) as stopped:
        tutorial.parse_settings(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_defaults_are_the_settings_table(tutorial):
    settings = tutorial.parse_settings([])
    for name, (default, _, _) in tutorial.SETTINGS.items():
        if name != "model":
            assert getattr(settings, name) == default, name
    assert (settings.epochs, settings.batch_size, settings.validation_split) == (10, 128, 0.1)
    assert settings.train_subset == 0 and settings.seed == 1 and not settings.predict
    assert settings.model.endswith("mnist_cnn.keras")


def test_quick_means_one_epoch_on_all_images_unless_overridden(tutorial):
    quick = tutorial.parse_settings(["--quick"])
    assert (quick.epochs, quick.train_subset) == (1, 0)
    custom = tutorial.parse_settings(["--quick", "--epochs", "2", "--train-subset", "3000"])
    assert (custom.epochs, custom.train_subset) == (2, 3000)


def test_every_setting_is_a_flag_of_the_right_type(tutorial):
    """The flags are generated from the one table: each setting is a flag, and a value given
    on the command line arrives with the default's type."""
    for name, (default, _, _) in tutorial.SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            assert getattr(tutorial.parse_settings([flag]), name) is True
        elif isinstance(default, list):
            assert getattr(tutorial.parse_settings([flag, "a.png", "b"]), name) == ["a.png", "b"]
        else:  # numbers and text: the default's own value, given as text, comes back typed
            given = str(default) if default != "" else "x"
            value = getattr(tutorial.parse_settings([flag, given]), name)
            assert value == (default if default != "" else "x") or name == "model", name
            assert type(value) is type(default), name


def test_notebook_kernel_arguments_are_ignored_but_our_flags_apply(tutorial):
    settings = tutorial.parse_settings(
        ["-f", "/root/.local/share/jupyter/runtime/kernel-1.json", "--epochs", "3"],
        in_notebook=True)
    assert settings.epochs == 3


def test_unknown_flag_is_an_error_in_a_script(tutorial, capsys):
    assert "unrecognized arguments" in parse_error(tutorial, capsys, ["-f", "kernel.json"])


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--epochs", "-3"], "--epochs must be at least 1"),
    (["--epochs", "ten"], "invalid int value"),
    (["--epochs", "1.5"], "invalid int value"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "many"], "invalid int value"),
    (["--validation-split", "0"], "strictly between 0 and 1"),
    (["--validation-split", "1"], "strictly between 0 and 1"),
    (["--validation-split", "1.5"], "strictly between 0 and 1"),
    (["--validation-split", "-0.2"], "strictly between 0 and 1"),
    (["--validation-split", "half"], "invalid float value"),
    (["--train-subset", "10"], "--train-subset must be 0 (all) or from 100 to 60000"),
    (["--train-subset", "70000"], "--train-subset must be 0 (all) or from 100 to 60000"),
    (["--cpu-replicas", "0"], "--cpu-replicas must be at least 1"),
    (["--peak-learning-rate", "0"], "--peak-learning-rate must be above 0"),
    (["--warmup-fraction", "1"], "--warmup-fraction must be from 0 to below 1"),
    (["--label-smoothing", "-0.1"], "--label-smoothing must be from 0 to below 1"),
    (["--max-rotation", "200"], "--max-rotation must be from 0 to 180"),
    (["--max-shift", "-1"], "--max-shift must be from 0 to 14"),
    (["--max-zoom", "1"], "--max-zoom must be from 0 to below 1"),
    (["--augment-min-epochs", "0"], "--augment-min-epochs must be at least 1"),
    (["--precision", "half"], "--precision must be auto, float32 or mixed, got half"),
    (["--jit", "maybe"], "--jit must be auto, on or off, got maybe"),
])
def test_bad_values_give_an_argparse_message_and_exit_code_2(tutorial, capsys, argv, message):
    error = parse_error(tutorial, capsys, argv)
    assert message in error and error.startswith("usage:")


def test_output_dir_that_is_a_file_is_refused(tutorial, capsys, tmp_path):
    a_file = tmp_path / "outputs"
    a_file.write_text("not a folder")
    assert "is a file, not a folder" in parse_error(
        tutorial, capsys, ["--output-dir", str(a_file)])


def test_help_shows_every_flag_with_its_default():
    completed = run_script(["--help"])
    assert completed.returncode == 0
    for flag in ("--epochs", "--batch-size", "--validation-split", "--train-subset", "--seed",
                 "--data-dir", "--output-dir", "--no-show", "--quick", "--predict", "--model",
                 "--peak-learning-rate", "--warmup-fraction", "--label-smoothing",
                 "--max-rotation", "--max-shift", "--max-zoom", "--augment-min-epochs",
                 "--precision", "--jit", "--cpu", "--cpu-replicas"):
        assert flag in completed.stdout
    text = " ".join(completed.stdout.split())  # argparse wraps lines to the terminal
    assert "--batch-size BATCH_SIZE images per gradient step (default: 128)" in text
    assert "--epochs EPOCHS passes over the training images (default: 10; 1 with --quick)" in text
    assert not completed.stderr


def test_bad_value_stops_before_any_data_is_loaded(tmp_path):
    """The data folder does not exist, yet the message is about the flag: checked first."""
    completed = run_script(["--epochs", "0", "--data-dir", str(tmp_path / "nowhere"),
                            "--output-dir", str(tmp_path / "out")])
    assert completed.returncode == 2
    assert "--epochs must be at least 1" in completed.stderr
    assert "Traceback" not in completed.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend, message", [
    ("tensorflw", "is not a backend this tutorial can train with"),
    ("numpy", "is not a backend this tutorial can train with"),
])
def test_unknown_backend_is_one_line_not_a_traceback(tmp_path, backend, message):
    completed = run_script(["--quick", "--output-dir", str(tmp_path)],
                           env_overrides={"KERAS_BACKEND": backend})
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert message in completed.stderr and "jax" in completed.stderr


def test_backend_that_is_not_installed_says_how_to_install_it(tmp_path):
    """`import torch` fails, as on a machine without PyTorch: one line saying what to install."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
        "sys.meta_path.insert(0, NoTorch())\n")
    completed = run_script(["--quick", "--output-dir", str(tmp_path / "out")],
                           env_overrides={"KERAS_BACKEND": "torch", "PYTHONPATH": str(hide)})
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert "pip install torch" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr


@pytest.mark.parametrize("where, reason", [
    ("/proc/cnn_mnist_outputs", "cannot write to the output folder"),
    ("FILE/sub", "cannot write to the output folder"),
])
def test_output_folder_that_cannot_be_made_is_one_line(tmp_path, where, reason):
    (tmp_path / "FILE").write_text("a file in the way")
    path = where.replace("FILE", str(tmp_path / "FILE"))
    completed = run_script(["--quick", "--no-show", "--output-dir", path, "--data-dir",
                            str(tmp_path / "never-read")])
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert reason in completed.stderr and path in completed.stderr
    assert len([line for line in completed.stderr.splitlines() if "error" in line]) == 1


def test_a_write_that_fails_midway_leaves_nothing_behind(tutorial, tmp_path, capsys):
    """Disk full while writing: a plain message, exit 1, no partial file."""
    import errno

    def write_then_fail(temporary_path):
        with open(temporary_path, "w") as handle:
            handle.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SystemExit) as stopped:
        tutorial.write_atomically(str(tmp_path / "metrics.json"), write_then_fail)
    assert stopped.value.code == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_requirements_pin_safe_floors():
    """Keras 3.14+ (safe_mode bypass and path traversal fixes), Pillow named with a floor."""
    from conftest import ROOT
    import importlib.metadata
    text = open(f"{ROOT}/requirements.txt", encoding="utf-8").read()
    floors = dict(re.findall(r"^([A-Za-z]+)>=([\d.]+)", text, flags=re.MULTILINE))
    as_tuple = lambda version: tuple(int(part) for part in version.split(".")[:3])
    assert as_tuple(floors["keras"]) >= (3, 14)
    assert as_tuple(floors["pillow"]) >= (10, 3)
    assert as_tuple(importlib.metadata.version("keras")) >= as_tuple(floors["keras"])
    assert as_tuple(importlib.metadata.version("pillow")) >= as_tuple(floors["pillow"])
