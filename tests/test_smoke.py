"""The tutorial run end to end on a real MNIST subset, as a user (and Colab) would run it."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from conftest import DATA_ARGS, DATA_DIR, EXPECTED_FIGURES, METRIC_KEYS, ROOT, SCRIPT, run_script


def test_quick_run_writes_every_figure_and_learns(quick_run):
    completed, output_dir, metrics = quick_run
    assert "Traceback" not in completed.stderr
    for name in EXPECTED_FIGURES:
        path = output_dir / name
        assert path.is_file() and path.stat().st_size > 10_000, f"{name} missing or empty"
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 150
    assert not list(output_dir.glob("*.partial*")), "a temporary file was left behind"
    for key in METRIC_KEYS:
        assert key in metrics, f"metrics.json lacks {key}"
    assert metrics["epochs"] == 1 and metrics["parameters"] == 250_058
    assert metrics["reload_predictions_match"] is True
    # Chance is 10%; one short epoch must already be far above it.
    assert metrics["test_accuracy"] >= 0.80, metrics
    assert metrics["best_val_accuracy"] >= 0.80, metrics
    history = (output_dir / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and "val_accuracy" in history[0]
    assert len(history) == 2  # header + one epoch
    assert f"Test accuracy {metrics['test_accuracy']:.4f}" in completed.stdout


def test_saved_model_reloads_in_a_fresh_process_and_scores_the_same(quick_run, tmp_path):
    _, output_dir, metrics = quick_run
    program = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {ROOT!r})
        import keras, numpy as np
        import cnn_mnist_classifier as tutorial
        _, _, x_test, y_test = tutorial.load_mnist({DATA_DIR!r})[0]
        model = keras.saving.load_model({str(output_dir / "mnist_cnn.keras")!r})
        probabilities = model.predict(tutorial.preprocess_images(x_test), verbose=0)
        print("ACCURACY", float((probabilities.argmax(1) == y_test).mean()))
    """)
    completed = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    accuracy = float(completed.stdout.split("ACCURACY")[-1])
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-4)


def test_runs_as_one_notebook_cell_and_repeats_the_same_numbers(quick_run, tmp_path):
    """Colab's way: the whole file in one cell of a real Jupyter kernel, after a cell that
    sets sys.argv. Same seed and settings as the script run, so the same test accuracy
    (this is also the reproducibility check: two CPU runs, same numbers)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    _, _, script_metrics = quick_run
    output_dir = tmp_path / "notebook_outputs"
    argv = ["cnn_mnist_classifier.py", "--quick", "--output-dir", str(output_dir), *DATA_ARGS]
    with open(SCRIPT, encoding="utf-8") as handle:
        source = handle.read()
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(f"import sys\nsys.argv = {argv!r}"),
                      nbformat.v4.new_code_cell(source)]
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = notebook.cells[1].outputs
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs), \
        "figures should be shown inline in a notebook"
    for name in EXPECTED_FIGURES:
        assert (output_dir / name).is_file(), name
    with open(output_dir / "metrics.json", encoding="utf-8") as handle:
        notebook_metrics = json.load(handle)
    assert notebook_metrics["test_accuracy"] == script_metrics["test_accuracy"]
    assert notebook_metrics["test_loss"] == script_metrics["test_loss"]


def test_mirrored_strategy_path_runs_on_a_cpu_split_in_two(tmp_path):
    completed = run_script(["--epochs", "2", "--train-subset", "3000", "--cpu-replicas", "2",
                            "--no-show", "--output-dir", str(tmp_path), *DATA_ARGS])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "MirroredStrategy: 2 copies" in completed.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["device"] == "CPU split into 2 devices"
    assert metrics["reload_predictions_match"] is True
    assert metrics["test_accuracy"] > 0.5  # 44 steps on 2,700 images: learning, not chance
