"""The tutorial run end to end on a real MNIST subset, as a user (and Colab) would run it."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from conftest import DATA_DIR, EXPECTED_FIGURES, METRIC_KEYS, ROOT, SCRIPT, run_script

# Makes `import tensorflow` fail in a child process, as on a machine without TensorFlow.
NO_TENSORFLOW = textwrap.dedent("""
    import sys
    class NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ModuleNotFoundError("No module named 'tensorflow' (hidden by the test)")
    sys.meta_path.insert(0, NoTensorFlow())
""")


def check_run(completed, output_dir, epochs=1, least_accuracy=0.80):
    """What a user checks after a run: every figure, no traceback, metrics that make sense."""
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    for name in EXPECTED_FIGURES:
        path = output_dir / name
        assert path.is_file() and path.stat().st_size > 10_000, f"{name} missing or empty"
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 150
    assert not list(output_dir.glob("*.partial*")), "a temporary file was left behind"
    metrics = json.loads((output_dir / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert key in metrics, f"metrics.json lacks {key}"
    assert metrics["epochs"] == epochs and metrics["parameters"] == 250_058
    assert metrics["reload_predictions_match"] is True
    # Chance is 10%; one short epoch must already be far above it.
    assert metrics["test_accuracy"] >= least_accuracy, metrics
    assert metrics["best_val_accuracy"] >= least_accuracy, metrics
    return metrics


def test_quick_run_writes_every_figure_and_learns(quick_run):
    completed, output_dir, metrics = quick_run
    check_run(completed, output_dir)
    assert metrics["backend"] == "tensorflow" and metrics["steps_per_epoch"] == 422
    assert metrics["test_accuracy"] >= 0.985, metrics  # --quick: a model worth drawing with
    history = (output_dir / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and "val_accuracy" in history[0]
    assert len(history) == 2  # header + one epoch
    assert f"Test accuracy {metrics['test_accuracy']:.4f}" in completed.stdout
    # Overfitting demo: the small network memorises its 1,000 images.
    assert metrics["overfit_final_train_accuracy"] > metrics["overfit_final_val_accuracy"]


def test_untrained_loss_is_about_ln_10(quick_run):
    _, _, metrics = quick_run
    assert abs(metrics["untrained_loss"] - 2.30) < 0.15, metrics["untrained_loss"]


def test_every_section_prints_its_heading_in_order(quick_run):
    completed, _, _ = quick_run
    with open(SCRIPT, encoding="utf-8") as handle:
        headings = re.findall(r"^# (## \d+\. .+)$", handle.read(), flags=re.MULTILINE)
    printed = [line for line in completed.stdout.splitlines() if line.startswith("## ")]
    # Section 1 (the settings table) and 23 (the --predict tool) print nothing in a lesson run.
    lesson = [h.replace("`", "") for h in headings if not h.startswith(("## 1.", "## 23."))]
    assert [p.replace("`", "") for p in printed] == lesson
    assert completed.stdout.startswith("## 2. Setup")  # the output begins with a heading
    assert not completed.stderr.strip(), completed.stderr[-2000:]  # no start-up chatter


def test_saved_model_reloads_on_jax_in_a_fresh_process(quick_run):
    """Saved with TensorFlow, loaded with JAX in a fresh process: it scores the same. (On
    TensorFlow: test_model's safe-mode test.)"""
    _, output_dir, metrics = quick_run
    program = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from benchmark import load_tutorial
        tutorial = load_tutorial()
        import keras
        _, _, x_test, y_test = tutorial.load_mnist({DATA_DIR!r})[0]
        model = keras.saving.load_model({str(output_dir / "mnist_cnn.keras")!r})
        probabilities = model.predict(tutorial.preprocess_images(x_test), verbose=0)
        print("ACCURACY", keras.backend.backend(), float((probabilities.argmax(1) == y_test).mean()))
    """)
    completed = subprocess.run([sys.executable, "-c", program], capture_output=True,
                               text=True, timeout=300, env=dict(os.environ, KERAS_BACKEND="jax"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    used, accuracy = completed.stdout.split("ACCURACY")[-1].split()
    assert used == "jax"
    assert float(accuracy) == pytest.approx(metrics["test_accuracy"], abs=1e-4)


def run_notebook(cells, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(cell) for cell in cells]
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    return notebook


def test_runs_as_one_cell_and_cell_by_cell_with_the_same_numbers(tmp_path, small_mnist):
    """Colab's way: the whole file in one cell of a real Jupyter kernel, after a cell that
    sets sys.argv; and VS Code's and jupytext's: each `# %%` cell its own notebook cell, in
    order. Same seed and settings, so the same test accuracy (this is also the
    reproducibility check: two CPU runs, same numbers). Both runs also take TensorFlow's
    two-device path (the CPU split in two) and read a float mnist.npz: one pair of runs for
    all of it, to keep the suite short."""
    with open(SCRIPT, encoding="utf-8") as handle:
        source = handle.read()
    metrics = []
    for way in ("one cell", "cell by cell"):
        output_dir = tmp_path / way.replace(" ", "_")
        argv = ["cnn_mnist_classifier.py", "--quick", "--train-subset", "1000",
                "--cpu-replicas", "2", "--output-dir", str(output_dir), *small_mnist]
        cells = re.split(r"^# %%.*$", source, flags=re.MULTILINE)[1:]  # [0]: the docstring
        code = [source] if way == "one cell" else [cell for cell in cells if cell.strip() and
                                                  not all(line.startswith("#") or not
                                                          line.strip() for line in
                                                          cell.splitlines())]
        notebook = run_notebook([f"import sys\nsys.argv = {argv!r}", *code], tmp_path)
        outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
        assert not [o for o in outputs if o.output_type == "error"]
        assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs), \
            "figures should be shown inline in a notebook"
        assert any("To draw a digit here" in o.get("text", "") or "application/vnd.jupyter"
                   ".widget-view+json" in o.get("data", {}) for o in outputs), \
            "the drawing canvas (a widget) or the line saying how to get it"
        for name in EXPECTED_FIGURES:
            assert (output_dir / name).is_file(), name
        metrics.append(json.loads((output_dir / "metrics.json").read_text()))
    assert len(code) > 15
    assert metrics[0]["device"] == "CPU split into 2 devices"
    assert metrics[0]["data_source"].endswith("mnist.npz")
    assert metrics[0]["reload_predictions_match"] is True
    assert metrics[0]["test_accuracy"] > 0.5  # 7 steps on 900 images: learning, not chance
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]
    assert metrics[0]["test_loss"] == metrics[1]["test_loss"]


def test_jax_runs_without_tensorflow_with_augmentation_on_two_devices(tmp_path, small_mnist):
    """JAX on a machine where `import tensorflow` fails; augmentation forced on; the CPU split
    into two devices (JAX's DataParallel path). One run for the three, to keep the suite short."""
    hide = tmp_path / "hide_tensorflow"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(NO_TENSORFLOW)
    output_dir = tmp_path / "out"
    completed = run_script(["--quick", "--train-subset", "2000", "--augment-min-epochs", "1",
                            "--cpu-replicas", "2", "--no-show", "--output-dir", str(output_dir),
                            *small_mnist],
                           env_overrides={"KERAS_BACKEND": "jax", "PYTHONPATH": str(hide)})
    metrics = check_run(completed, output_dir, least_accuracy=0.5)  # 15 augmented steps
    assert metrics["backend"] == "jax" and metrics["augmentation"] is True
    assert metrics["device"] == "CPU split into 2 devices"
    assert metrics["jit_compile"] is True  # auto: JAX compiles on a CPU too
    assert "augmentation: on" in completed.stdout
    check = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True,
                           env=dict(os.environ, PYTHONPATH=str(hide)))
    assert check.returncode != 0  # the hiding really works
