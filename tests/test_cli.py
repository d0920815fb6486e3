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
                 "--data-dir", "--output-dir", "--no-show", "--quick", "--predict", "--model"):
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
