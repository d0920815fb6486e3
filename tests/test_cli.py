"""Command-line flags: defaults, overrides, notebook arguments, and every bad value."""
import re

import pytest

from conftest import run_script


def parse_error(tutorial, capsys, argv):
    with pytest.raises(SystemExit) as stopped:
        tutorial.parse_settings(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_defaults_match_the_settings_cell(tutorial):
    settings = tutorial.parse_settings([])
    assert settings.epochs == tutorial.EPOCHS == 10
    assert settings.batch_size == tutorial.BATCH_SIZE == 128
    assert settings.validation_split == tutorial.VALIDATION_SPLIT == 0.1
    assert settings.train_subset is None and settings.seed == tutorial.SEED
    assert settings.output_dir == tutorial.OUTPUT_DIR and not settings.predict


def test_quick_means_one_epoch_on_a_subset_unless_overridden(tutorial):
    quick = tutorial.parse_settings(["--quick"])
    assert (quick.epochs, quick.train_subset) == (1, tutorial.QUICK_TRAIN_SUBSET)
    custom = tutorial.parse_settings(["--quick", "--epochs", "2", "--train-subset", "3000"])
    assert (custom.epochs, custom.train_subset) == (2, 3000)


def test_notebook_kernel_arguments_are_ignored_but_our_flags_apply(tutorial):
    settings = tutorial.parse_settings(
        ["-f", "/root/.local/share/jupyter/runtime/kernel-1.json", "--epochs", "3"],
        in_notebook=True)
    assert settings.epochs == 3


def test_unknown_flag_is_an_error_in_a_script(tutorial, capsys):
    assert "unrecognized arguments" in parse_error(tutorial, capsys, ["-f", "kernel.json"])


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be a positive whole number"),
    (["--epochs", "-3"], "--epochs must be a positive whole number"),
    (["--epochs", "ten"], "invalid int value"),
    (["--epochs", "1.5"], "invalid int value"),
    (["--batch-size", "0"], "--batch-size must be a positive whole number"),
    (["--batch-size", "many"], "invalid int value"),
    (["--validation-split", "0"], "strictly between 0 and 1"),
    (["--validation-split", "1"], "strictly between 0 and 1"),
    (["--validation-split", "1.5"], "strictly between 0 and 1"),
    (["--validation-split", "-0.2"], "strictly between 0 and 1"),
    (["--validation-split", "half"], "invalid float value"),
    (["--train-subset", "10"], "--train-subset must be between 100 and 60000"),
    (["--train-subset", "70000"], "--train-subset must be between 100 and 60000"),
    (["--cpu-replicas", "0"], "--cpu-replicas must be a positive whole number"),
    (["--peak-learning-rate", "0"], "--peak-learning-rate must be above 0"),
    (["--warmup-fraction", "1"], "--warmup-fraction must be from 0 to below 1"),
    (["--label-smoothing", "-0.1"], "--label-smoothing must be from 0 to below 1"),
    (["--max-rotation", "200"], "--max-rotation must be 0-180 degrees"),
    (["--max-shift", "-1"], "--max-shift must be 0-14 pixels"),
    (["--max-zoom", "1"], "--max-zoom must be from 0 to below 1"),
    (["--precision", "half"], "invalid choice"),
    (["--jit", "maybe"], "invalid choice"),
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
    assert re.search(r"--batch-size BATCH_SIZE\s+images per step \(default: 128\)",
                     completed.stdout)


def test_bad_value_stops_before_any_data_is_loaded(tmp_path):
    """The data folder does not exist, yet the message is about the flag: checked first."""
    completed = run_script(["--epochs", "0", "--data-dir", str(tmp_path / "nowhere"),
                            "--output-dir", str(tmp_path / "out")])
    assert completed.returncode == 2
    assert "--epochs must be a positive whole number" in completed.stderr
    assert "Traceback" not in completed.stderr and not (tmp_path / "out").exists()


def test_every_setting_in_the_settings_cell_has_a_flag(tutorial):
    """The settings cell names a flag beside each knob; each of those flags exists and its
    default is the constant's value."""
    import inspect
    parser = tutorial.build_argument_parser()
    defaults = {action.dest: action.default for action in parser._actions}
    source = inspect.getsource(tutorial)
    settings_cell = source.split("# ## 1. Settings")[1].split("# ## 2.")[0]
    named = re.findall(r"^([A-Z_]+) = .*# (--[a-z-]+)", settings_cell, flags=re.MULTILINE)
    assert len(named) >= 15
    for constant, flag in named:
        dest = flag[2:].replace("-", "_")
        assert dest in defaults, flag
        if defaults[dest] is not None:
            assert defaults[dest] == getattr(tutorial, constant), (flag, constant)


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
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'torch' else real(name, *a)\n")
    completed = run_script(["--quick", "--output-dir", str(tmp_path / "out")],
                           env_overrides={"KERAS_BACKEND": "torch", "PYTHONPATH": str(hide)})
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert "pip install torch" in completed.stderr


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
