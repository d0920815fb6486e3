"""Handwritten digits with a convolutional network: MNIST with Keras 3, explained.

Read it top to bottom: load the MNIST digits and look at them, meet a neuron and a first
(dense) network, compute a convolution by hand, then build a convolutional network, train it
with Adam, watch it learn and overfit, evaluate it once, look inside it, save it, and read
*your* handwritten digit, from a photo or drawn with the mouse. It runs on TensorFlow (the
default), JAX or PyTorch, on a CPU or a GPU, and reaches about 99.5% test accuracy (README.md).

    pip install -r requirements.txt && python cnn_mnist_classifier.py    # --help: every flag

or paste the whole file into one Google Colab cell and run it. Everything it makes goes to
`outputs/`: numbered figures, `history.csv`, `metrics.json` and `mnist_cnn.keras`.

How to read it: sections 1-2 (settings, setup) and section 3's file readers are machinery, to
skim. The lesson runs from the line that loads MNIST (`... = load_mnist(settings.data_dir)`)
to section 20. Sections 21-23 put the trained network to work on your own digits.
"""

# %% [markdown]
# ## 1. Settings
#
# Machinery: on a first reading, skip to the line that loads MNIST in section 3. Every knob a
# learner may want to turn is one row of this table: its default and what it does (each is
# explained where the lesson uses it). In Colab, edit a default and run again; in a shell,
# pass the flag of the same name (`epochs` is `--epochs 3`); `--help` lists them all.

# %%
import argparse
import os
import sys


AT_LEAST_1 = (lambda n: n >= 1, "at least 1")  # a setting's check: (is it valid?, in words)
FRACTION = (lambda x: 0 <= x < 1, "from 0 to below 1")


SETTINGS = {  # name: (default, help, check). The type of the default is the flag's type.
    # Data
    "data_dir": (os.environ.get("MNIST_DATA_DIR", ""), "folder with the four MNIST files or "
                 "mnist.npz; empty: $MNIST_DATA_DIR, else download with Keras", None),
    "train_subset": (0, "train on a class-balanced subset of N images; 0: all 60,000",
                     (lambda n: n == 0 or 100 <= n <= 60_000, "0 (all) or from 100 to 60000")),
    "validation_split": (0.1, "share of the training images held out for validation",
                         (lambda x: 0 < x < 1, "strictly between 0 and 1")),
    # Training
    "epochs": (10, "passes over the training images", AT_LEAST_1),
    "batch_size": (128, "images per gradient step", AT_LEAST_1),
    "peak_learning_rate": (6e-3, "Adam's step size after the warm-up",
                           (lambda x: x > 0, "above 0")),
    "warmup_fraction": (0.3, "share of all steps spent ramping up", FRACTION),
    "label_smoothing": (0.1, "aim for 0.91, not 1, on the right digit; 0: off", FRACTION),
    "max_rotation": (8.0, "augmentation: rotate by up to this many degrees",
                     (lambda x: 0 <= x <= 180, "from 0 to 180")),
    "max_shift": (2.0, "augmentation: shift by up to this many pixels each way",
                  (lambda x: 0 <= x <= 14, "from 0 to 14")),
    "max_zoom": (0.1, "augmentation: scale by a factor from 1 - this to 1 + this", FRACTION),
    "augment_min_epochs": (5, "augment only runs of at least this many epochs", AT_LEAST_1),
    "seed": (1, "same seed, settings, backend and CPU machine: same numbers (not with --jit "
                "on, on TensorFlow)", None),
    # Where the maths runs
    "precision": ("auto", "auto (mixed float16 on a GPU, else float32), float32 or mixed",
                  (lambda text: text in ("auto", "float32", "mixed"), "auto, float32 or mixed")),
    "jit": ("auto", "compile the training step: auto (on a GPU, and with JAX), on or off",
            (lambda text: text in ("auto", "on", "off"), "auto, on or off")),
    "cpu": (False, "ignore any GPU and train on the CPU", None),
    "cpu_replicas": (1, "split the CPU into N devices to try multi-device training", AT_LEAST_1),
    # Output, and the tools
    "output_dir": ("outputs", "where figures, history.csv, metrics.json and the model go", None),
    "no_show": (False, "only save figures, never open windows", None),
    "quick": (False, "a short tour: 1 epoch over all the training images", None),
    "predict": ([], "skip the lesson: read these images (files or folders) of digits", None),
    "draw": (False, "skip the lesson: draw digits in a window and watch the model read them",
             None),
    "model": ("", "the model --predict and --draw read; empty: OUTPUT_DIR/mnist_cnn.keras",
              None),
}
QUICK = {"epochs": 1}  # what --quick changes, unless given too


# %%
def parse_settings(argv=None, in_notebook=False):
    """The table above as command-line flags. A bad value: one line and exit code 2. In a
    notebook the kernel's own arguments (`-f kernel.json`) are ignored."""
    parser = argparse.ArgumentParser(prog="cnn_mnist_classifier.py", allow_abbrev=False,
                                     description="Learn, train and save a convolutional "
                                     "network on MNIST. Backend: KERAS_BACKEND=tensorflow "
                                     "(default), jax or torch.")
    for name, (default, help_text, _) in SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", default=default, metavar="IMAGE",
                                help=help_text)
        else:
            quick = f"; {QUICK[name]} with --quick" if name in QUICK else ""
            parser.add_argument(flag, type=type(default), default=None,
                                help=f"{help_text} (default: {default!r}{quick})")
    known = parser.parse_known_args(argv)[0] if in_notebook else parser.parse_args(argv)
    for name, (default, _, check) in SETTINGS.items():
        if getattr(known, name) is None:
            setattr(known, name, QUICK[name] if known.quick and name in QUICK else default)
        value = getattr(known, name)
        if check and not check[0](value):
            parser.error(f"--{name.replace('_', '-')} must be {check[1]}, got {value}")
    if known.predict and known.draw:
        parser.error("choose one of --predict and --draw")
    if os.path.isfile(known.output_dir):
        parser.error(f"--output-dir {known.output_dir!r} is a file, not a folder")
    known.model = known.model or os.path.join(known.output_dir, "mnist_cnn.keras")
    return known


# %% [markdown]
# ## 2. Setup
#
# What must run before the lesson: read the settings, import Keras with the chosen backend,
# make the output folder, choose the device, and take the tool exits (`--predict`, `--draw`).
# Section 12 explains backends and devices. Skip this section on a first reading.

# %%
import ast
import atexit
import contextlib
import re
import signal
import subprocess
import tempfile
import threading

IN_NOTEBOOK = "ipykernel" in sys.modules  # Jupyter, VS Code cells and Colab
IN_COLAB = "google.colab" in sys.modules
RUNNING = __name__ == "__main__"          # False when --predict or the tests load this file
DEVICE_COUNT = 1                          # setup_device below counts them


def fail(message, exit_code=1):
    """Stop with a plain message (no traceback) for a problem the user can fix."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(exit_code)


# The filter below, run as its own small process: TensorFlow's C++ info, warning and error
# lines are held back (shown on request); everything else passes, fatal lines (F...) included.
NATIVE_LOG_FILTER = r"""
import os, re, sys
held, pattern = [], re.compile(rb"WARNING: All log messages before absl|[IWE]\d{4} \d\d:\d\d:")
for line in sys.stdin.buffer:
    if line == b"\0show held\n":
        os.write(2, b"".join(held))
    elif pattern.match(line):
        held.append(line)
    else:
        os.write(2, line)
"""


def hide_native_logs():
    """TensorFlow's C++ code logs straight to file 2 (stderr), whatever TF_CPP_MIN_LOG_LEVEL
    says. Route file 2 through NATIVE_LOG_FILTER. A separate process, not a thread: when the
    run crashes, it still passes on the crash's last words. Returns a function that shows
    what was held back."""
    try:
        keep = subprocess.Popen([sys.executable, "-I", "-S", "-c", NATIVE_LOG_FILTER],
                                stdin=subprocess.PIPE, start_new_session=True)  # no Ctrl-C
    except OSError:  # no Python executable to start (an embedded Python): logs stay as they are
        return lambda: None
    terminal = os.dup(2)
    os.dup2(keep.stdin.fileno(), 2)
    keep.stdin.close()  # file 2 is now the only way in: the filter ends when it closes

    def restore():  # at exit: the terminal back on file 2, the filter finishes its last lines
        sys.stderr.flush()
        os.dup2(terminal, 2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            keep.wait(5)
    atexit.register(restore)
    return lambda: os.write(2, b"\0show held\n")


# %%
def stop_quietly_on_ctrl_c():
    """Ctrl-C outside training ends the run with one line, not a traceback."""
    message = "\nStopped by Ctrl-C. Files already written are complete; nothing half-written."
    if IN_NOTEBOOK and sys.modules["IPython"].get_ipython():
        sys.modules["IPython"].get_ipython().set_custom_exc(
            (KeyboardInterrupt,), lambda *args, **kwargs: print(message))
    elif not IN_NOTEBOOK:
        hook, unraisable_hook = sys.excepthook, sys.unraisablehook
        sys.excepthook = lambda kind, value, trace: (
            print(message, file=sys.stderr) if issubclass(kind, KeyboardInterrupt)
            else hook(kind, value, trace))
        # A Ctrl-C that lands in a clean-up callback (TensorFlow's, for example) would be
        # "ignored" there: send it again a moment later, so that it reaches the running code.
        sys.unraisablehook = lambda info: (
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            if issubclass(info.exc_type, KeyboardInterrupt) else unraisable_hook(info))


def load_definitions(path):
    """This file's imports, CONSTANTS, functions and classes, without the lesson: --predict
    and --draw use it to skip training, and the tests to call the helpers."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    imports, kept = (ast.Import, ast.ImportFrom), (ast.FunctionDef, ast.ClassDef)
    tree.body = [node for node in tree.body if isinstance(node, (*imports, *kept)) or (
        isinstance(node, ast.Try) and all(isinstance(n, imports) for n in node.body)) or (
        isinstance(node, ast.Assign) and all(getattr(t, "id", "").isupper() for t in node.targets))]
    module = type(sys)("cnn_mnist_classifier")
    module.__file__ = path
    sys.modules.setdefault("cnn_mnist_classifier", module)
    exec(compile(tree, path, "exec"), module.__dict__)
    return module


# %%
if RUNNING:
    settings = parse_settings(sys.argv[1:], in_notebook=IN_NOTEBOOK)
    print("## 2. Setup")
    try:
        os.makedirs(settings.output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=settings.output_dir).close()  # can we write there?
    except OSError as error:
        fail(f"cannot write to the output folder {settings.output_dir!r} "
             f"({error.strerror or error}). Choose another folder with --output-dir.")
    stop_quietly_on_ctrl_c()
    if settings.cpu:  # hide every GPU from every backend, before it starts
        os.environ.update(CUDA_VISIBLE_DEVICES="-1", JAX_PLATFORMS="cpu")
    if settings.cpu_replicas > 1:  # JAX: N devices on one CPU (TensorFlow: in setup_device)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                   f"platform_device_count={settings.cpu_replicas}")
    if os.environ.get("KERAS_BACKEND", "tensorflow") not in ("tensorflow", "jax", "torch"):
        fail(f"KERAS_BACKEND={os.environ['KERAS_BACKEND']!r} is not a backend this tutorial "
             "can train with; use tensorflow, jax or torch, for example: KERAS_BACKEND=jax "
             "python cnn_mnist_classifier.py")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
show_native_logs = hide_native_logs() if RUNNING else (lambda: None)
try:
    import keras
except ModuleNotFoundError as error:  # Keras, or the backend's own package, is missing
    fail(f"the Python package {error.name!r} is not installed. Install it (pip install "
         f"{error.name}, or everything: pip install -r requirements.txt)"
         + ("." if error.name == "keras" else " or choose another backend: "
            "KERAS_BACKEND=tensorflow, jax or torch."))
except BaseException:  # anything else: what TensorFlow logged, then the traceback
    show_native_logs()
    raise
import matplotlib
import numpy as np

BACKEND = keras.backend.backend()
if RUNNING and not IN_NOTEBOOK and (settings.no_show or not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        or sys.platform in ("win32", "darwin"))):
    matplotlib.use("Agg")  # no screen: draw into files only, never wait for a window
import matplotlib.pyplot as plt
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

if RUNNING and (settings.predict or settings.draw) and not IN_NOTEBOOK:  # tools: 22, 23
    tools = load_definitions(__file__)
    sys.exit(tools.draw_window(settings.model) if settings.draw else
             tools.predict_files(settings.predict, settings.model, settings.output_dir))


# %%
def setup_device(cpu_replicas, precision, jit):
    """Find the devices: (scope to build models in, name, count, precision, compile?).
    Each backend names its devices its own way: three short branches."""
    scope, count, gpus = contextlib.nullcontext, 1, []
    if BACKEND == "tensorflow":
        import tensorflow as tf
        with contextlib.suppress(RuntimeError):  # already set: a cell run a second time
            tf.config.set_logical_device_configuration(tf.config.list_physical_devices(
                "CPU")[0], [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
                for gpu in tf.config.list_physical_devices("GPU")]
        devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
        if len(devices) > 1:  # a copy of the model on each device, each batch split
            scope, count = tf.distribute.MirroredStrategy(devices).scope, len(devices)
        # Same seed, same numbers on a CPU (on a GPU it would cost speed). Keras turns XLA off
        # under op determinism, so --jit on gives this promise up.
        if not gpus and jit != "on":
            tf.config.experimental.enable_op_determinism()
    elif BACKEND == "jax":
        import jax
        count = len(jax.devices())
        gpus = [d.device_kind for d in jax.devices() if d.platform == "gpu"]
        if count > 1:  # a copy of the model on each device, each batch split
            keras.distribution.set_distribution(keras.distribution.DataParallel())
    else:  # PyTorch: one device in this tutorial
        import torch
        gpus = [torch.cuda.get_device_name(0)] if torch.cuda.is_available() else []
    mixed = precision == "mixed" or (precision == "auto" and bool(gpus))
    compiled = jit == "on" or (jit == "auto" and (bool(gpus) or BACKEND == "jax"))
    name = (f"{len(gpus)} x GPU ({gpus[0]})" if gpus else "CPU" if count == 1
            else f"CPU split into {count} devices")
    return scope, name, count, "mixed_float16" if mixed else "float32", compiled


if RUNNING:
    keras.utils.set_random_seed(settings.seed)  # Python, NumPy and the backend in one call
    build_scope, DEVICE, DEVICE_COUNT, PRECISION, JIT_COMPILE = setup_device(
        settings.cpu_replicas, settings.precision, settings.jit)
    if settings.batch_size % DEVICE_COUNT:
        fail(f"--batch-size {settings.batch_size} cannot be split evenly over {DEVICE_COUNT} "
             f"devices; use a multiple of {DEVICE_COUNT}")
    keras.mixed_precision.set_global_policy(PRECISION)
    print(f"Keras {keras.__version__} on {BACKEND}; device: {DEVICE}; precision {PRECISION}; "
          f"compiled: {'on' if JIT_COMPILE else 'off'}")


# %% [markdown]
# ## 3. Load MNIST
#
# MNIST has 60,000 training and 10,000 test images of handwritten digits, each 28x28 pixels
# whose values measure ink: 0 is background, 255 is full ink (a grey colour map draws that
# as white on black). Each comes with its label, 0-9. Keras downloads MNIST once and caches
# it; offline, point `--data-dir` (or `MNIST_DATA_DIR`) at a folder with the four original
# files or a Keras-style `mnist.npz`.
#
# The original files use the IDX format: a 4-byte *magic number* saying what the file holds
# (0x803 for images, 0x801 for labels), the count (and for images the rows and columns), then
# one byte per pixel or label. `read_idx_file` checks every one of those parts, so a truncated
# download is reported plainly instead of training on garbage.

# %%
print("\n## 3. Load MNIST")
import gzip
import math
import zlib

IDX_IMAGES_MAGIC = 0x00000803  # "unsigned bytes, 3 dimensions"
IDX_LABELS_MAGIC = 0x00000801  # "unsigned bytes, 1 dimension"
MNIST_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
               "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


class DataError(Exception):
    """A data file that is missing, damaged or not MNIST; the message says which and why."""


def read_idx_file(path):
    """Read one IDX file (gzipped or not) as a uint8 array, checking every field."""
    try:
        raw = open(path, "rb").read()
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw  # gzip's first bytes
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is a damaged or truncated gzip file ({error})") from None
    magic, count = int.from_bytes(raw[0:4], "big"), int.from_bytes(raw[4:8], "big")
    if len(raw) < 8 or magic not in (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC):
        raise DataError(f"{path} is not an MNIST IDX file (magic number {magic:#010x}, "
                        f"expected {IDX_IMAGES_MAGIC:#010x} or {IDX_LABELS_MAGIC:#010x})")
    header, shape = 8, (count,)
    if magic == IDX_IMAGES_MAGIC:
        rows, cols = int.from_bytes(raw[8:12], "big"), int.from_bytes(raw[12:16], "big")
        if (rows, cols) != (28, 28):
            raise DataError(f"{path} holds {rows}x{cols} images; MNIST images are 28x28")
        header, shape = 16, (count, rows, cols)
    if len(raw) != header + math.prod(shape):
        raise DataError(f"{path} should be {header + math.prod(shape):,} bytes for {count:,} "
                        f"items but is {len(raw):,}: it is truncated or damaged")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_mnist_npz(path):
    """A Keras-style mnist.npz; allow_pickle=False: never unpickle anything from a file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in MNIST_FILES if key in archive.files}
    except Exception as error:  # a damaged zip, or pickled objects
        raise DataError(f"{path} is not a readable mnist.npz ({error})") from None


# %%
def exact_array(array, key, source):
    """Images as uint8 0-255 and labels 0-9, or a DataError saying what is wrong. Arrays saved
    as other numbers are accepted only where their meaning is exact: whole numbers in range,
    or float images in [0, 1] (saved as pixels / 255), which are scaled back."""
    images = key.startswith("x")
    expected = ("images of shape (N, 28, 28), whole numbers 0-255" if images else
                "labels of shape (N,), whole numbers 0-9 (not one-hot)")
    shape_ok = array.shape[1:] == (28, 28) if images else array.ndim == 1
    if not shape_ok or array.dtype.kind not in "uif":  # unsigned, signed integers or floats
        raise DataError(f"{source}: {key} has shape {array.shape} and type {array.dtype}; "
                        f"expected {expected}")
    if array.dtype == np.uint8 and images:
        return array
    values = array.astype(np.float64)
    scaled_down = values.size and 0 <= values.min() <= values.max() <= 1
    if images and array.dtype.kind == "f" and scaled_down:
        values = values * 255  # saved as pixels / 255: scale back
    whole = np.round(values)
    if values.size and (np.abs(values - whole).max() > 1e-3 or not
                        0 <= whole.min() <= whole.max() <= (255 if images else 9)):
        raise DataError(f"{source}: {key} holds values from {values.min():g} to "
                        f"{values.max():g}, not all whole numbers in range; expected {expected}")
    return whole.astype(np.uint8 if images else np.int64)


def load_mnist_from_folder(data_dir):
    """The four IDX files (any of the usual spellings, gzipped or not), or mnist.npz."""
    if not os.path.isdir(data_dir):
        raise DataError(f"the data folder {data_dir!r} does not exist")
    names = {key: [os.path.join(data_dir, name + suffix) for name in (base, base.replace(
        "-idx", ".idx")) for suffix in (".gz", "")] for key, base in MNIST_FILES.items()}
    paths = {key: next((p for p in options if os.path.isfile(p)), None)
             for key, options in names.items()}
    npz = os.path.join(data_dir, "mnist.npz")
    if all(paths.values()):
        arrays = {key: read_idx_file(path) for key, path in paths.items()}
        source = f"IDX files in {data_dir}"
    elif os.path.isfile(npz):
        arrays, source = read_mnist_npz(npz), npz
    else:
        missing = [MNIST_FILES[key] + ".gz" for key, path in paths.items() if not path]
        raise DataError(f"{data_dir!r} has neither all four MNIST files (missing: "
                        f"{', '.join(missing)}) nor mnist.npz")
    if len(arrays) < 4:
        raise DataError(f"{source} lacks the array(s) "
                        f"{', '.join(sorted(set(MNIST_FILES) - set(arrays)))}; expected "
                        "x_train, y_train, x_test, y_test")
    arrays = {key: exact_array(array, key, source) for key, array in arrays.items()}
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise DataError(f"{source}: {len(arrays[f'x_{split}']):,} {split} images but "
                            f"{len(arrays[f'y_{split}']):,} labels; the counts must agree")
    return tuple(arrays[key] for key in MNIST_FILES), source


# %%
def load_mnist(data_dir=""):
    """(x_train, y_train, x_test, y_test) as uint8 images and integer labels, and where they
    came from. A problem ends the run with a message saying what to do."""
    try:
        if data_dir:
            return load_mnist_from_folder(data_dir)
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        return (x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)), \
            "keras.datasets.mnist (downloaded or cached)"
    except DataError as error:
        fail(f"{error}.\n  Download the four files train-images-idx3-ubyte.gz, train-labels-"
             "idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz into "
             "one folder and pass it with --data-dir.")
    except Exception as error:  # no internet, a proxy, a certificate problem, a bad cache
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        hint = ("\n  A certificate error usually means Python has no root certificates: on "
                "macOS run 'Install Certificates.command' from the Python folder, or 'pip "
                "install --upgrade certifi'." if "CERTIFICATE" in str(error).upper() else "")
        fail(f"could not download MNIST with Keras ({reason}).{hint}\n  Offline? Download the "
             "four MNIST files (train-images-idx3-ubyte.gz and the other three) into a folder "
             "and run again with --data-dir FOLDER (or set MNIST_DATA_DIR).")


(x_train_all, y_train_all, x_test_raw, y_test), DATA_SOURCE = load_mnist(settings.data_dir)
print(f"Loaded MNIST from {DATA_SOURCE}: {x_train_all.shape[0]:,} training and "
      f"{x_test_raw.shape[0]:,} test images of {x_train_all.shape[1]}x{x_train_all.shape[2]} "
      "pixels")
# -> Loaded ...: 60,000 training and 10,000 test images of 28x28 pixels


# %% [markdown]
# ## 4. Look at the data
#
# Always look before you train: sample digits with their labels, and how many examples each
# digit has. MNIST is roughly balanced (5,421 to 6,742 training images per digit), so plain
# accuracy, the share of digits read right, is a fair score. Every figure is saved to the
# output folder; files are written under a temporary name and then renamed, so a crash or
# Ctrl-C never leaves half a file.

# %%
print("\n## 4. Look at the data")


def write_atomically(path, write):
    """write(temporary_path), then rename; a write problem ends the run with one message."""
    temporary_path = "{0}.partial{1}".format(*os.path.splitext(path))  # keep .keras last
    try:
        write(temporary_path)
        os.replace(temporary_path, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(temporary_path)
        if not isinstance(error, OSError):
            raise  # Ctrl-C, or a bug; nothing half-written is left either way
        fail(f"cannot write {path} ({error.strerror or error}). Free some disk space or "
             "choose another folder with --output-dir.")


def save_figure(figure, filename, output_dir):
    """Save a figure as PNG (atomically) and show it in a notebook."""
    path = os.path.join(output_dir, filename)
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110,
                                                            bbox_inches="tight"))
    print(f"  figure: {path}")
    if IN_NOTEBOOK:
        plt.show()
    elif matplotlib.get_backend().lower() == "agg":
        plt.close(figure)  # keep only what a screen will show at the end of the run


# %%
def show_digit(axis, image, title=None, color="black"):
    axis.imshow(np.squeeze(image), cmap="gray", vmin=0, vmax=np.max(image) or 1)
    axis.set_xticks([])
    axis.set_yticks([])
    if title is not None:
        axis.set_title(title, fontsize=9, color=color)


def plot_sample_images(images, labels, count=32):
    figure, axes = plt.subplots(4, count // 4, figsize=(count // 4 * 1.2, 5.4))
    for axis, image, label in zip(axes.flat, images, labels):
        show_digit(axis, image, f"label {label}")
    figure.suptitle("Training images and their labels")
    return figure


def plot_class_distribution(y_train_labels, y_test_labels):
    figure, axis = plt.subplots(figsize=(8, 3.8))
    for offset, labels, name in ((-0.2, y_train_labels, "train"), (0.2, y_test_labels, "test")):
        axis.bar(np.arange(10) + offset, np.bincount(labels, minlength=10), width=0.4,
                 label=f"{name} ({len(labels):,})")
    axis.set_xticks(range(10))
    axis.set_xlabel("digit")
    axis.set_ylabel("images")
    axis.set_title("Class distribution: roughly balanced, so accuracy is a fair score")
    axis.legend()
    return figure


save_figure(plot_sample_images(x_train_all[:32], y_train_all[:32]), "01_sample_images.png",
            settings.output_dir)
save_figure(plot_class_distribution(y_train_all, y_test), "02_class_distribution.png",
            settings.output_dir)


# %% [markdown]
# ## 5. Preprocess, and split off a validation set
#
# The networks of sections 6-8 want their inputs in a fixed form (each point is explained
# again where it matters):
#
# * Shape `(N, 28, 28, 1)`: convolution layers (section 7) expect a *channel* axis, the number
#   of values per pixel (1 for grey, 3 for red, green and blue).
# * `float32` in [0, 1]: training adjusts the network in small steps, which works best when
#   the inputs are small numbers of a similar size (255 -> 1.0, 128 -> 0.5; figure 03 shows
#   one digit's numbers before and after).
# * One-hot labels: the digit 3 becomes `[0,0,0,1,0,0,0,0,0,0]`. The network answers with ten
#   probabilities, one per digit, and this is the answer it should give.
# * Validation: 10% of the *training* images (6,000) are held out. We watch them during
#   training and pick the best epoch with them, so they influence our choices. The test set
#   is used once, at the very end: since no decision was based on it, its score is an honest
#   estimate of how the network does on new digits.

# %%
print("\n## 5. Preprocess, and split off a validation set")


def balanced_subset_indices(labels, size, rng):
    """Pick `size` indices with (as near as possible) the same number of each digit."""
    per_class = [size // 10 + (1 if digit < size % 10 else 0) for digit in range(10)]
    chosen = np.concatenate([
        rng.choice(np.flatnonzero(labels == digit), size=min(wanted, np.sum(labels == digit)),
                   replace=False) for digit, wanted in enumerate(per_class)])
    if len(chosen) < size:  # a digit ran out (MNIST has 5,421 fives): top up with the others
        others = np.setdiff1d(np.arange(len(labels)), chosen)
        chosen = np.concatenate([chosen, rng.choice(others, size - len(chosen), replace=False)])
    return rng.permutation(chosen)


def preprocess_images(images):
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1]."""
    return (images.astype("float32") / 255.0)[..., np.newaxis]


def split_train_validation(images, labels, validation_split, subset, seed):
    """Shuffle with the seed, optionally take a balanced subset, then hold out validation."""
    rng = np.random.default_rng(seed)
    order = balanced_subset_indices(labels, subset, rng) if subset else rng.permutation(len(labels))
    validation_count = max(1, round(len(order) * validation_split))
    validation_idx, train_idx = order[:validation_count], order[validation_count:]
    return (images[train_idx], labels[train_idx]), (images[validation_idx], labels[validation_idx])


(train_images, train_labels), (val_images, val_labels) = split_train_validation(
    x_train_all, y_train_all, settings.validation_split, settings.train_subset, settings.seed)
x_train, x_val, x_test = (preprocess_images(a) for a in (train_images, val_images, x_test_raw))
y_train_onehot = keras.utils.to_categorical(train_labels, 10)
y_val_onehot = keras.utils.to_categorical(val_labels, 10)
print(f"train {x_train.shape}, validation {x_val.shape}, test {x_test.shape}; "
      f"labels one-hot {y_train_onehot.shape}")
# -> train (54000, 28, 28, 1), validation (6000, 28, 28, 1), test (10000, 28, 28, 1); ...

# %%
def plot_preprocessing(raw_image):
    """The same digit as stored (0-255) and as the network sees it (0-1), values written in."""
    figure, axes = plt.subplots(1, 2, figsize=(17, 8.2), layout="constrained")
    for axis, image, title, fmt in (
            (axes[0], raw_image, "raw: uint8 ink values 0-255", "{:.0f}"),
            (axes[1], raw_image / 255.0, "scaled: float32 values 0-1 (divided by 255)", "{:.1f}")):
        axis.imshow(image, cmap="gray", vmin=0, vmax=image.max())
        for (row, col), value in np.ndenumerate(image):
            if value > 0:
                axis.text(col, row, fmt.format(value), ha="center", va="center", fontsize=5.5,
                          color="black" if value > image.max() / 2 else "white")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(title)
    figure.suptitle("Preprocessing: same picture, numbers scaled to 0-1 (exact zeros left blank)")
    return figure


save_figure(plot_preprocessing(x_train_all[0]), "03_preprocessing.png", settings.output_dir)


# %% [markdown]
# ## 6. A first network: neurons and Dense layers
#
# A *neuron* multiplies each of its inputs by its own *weight*, adds the products and one
# more number, the *bias*, and passes the sum through an *activation*. With inputs (0.5, 1.0),
# weights (2, -1) and bias 0.5: 2*0.5 - 1*1.0 + 0.5 = 0.5. Our activation is *ReLU*,
# max(0, x): (-2, 0.5, 3) becomes (0, 0.5, 3). Without it, two layers in a row collapse into
# one, (x W1 + b1) W2 + b2 = x (W1 W2) + (b1 W2 + b2), so stacking layers would add nothing;
# ReLU's kink at 0 lets every extra layer add something new (boundaries between one digit
# and another made of many straight pieces, bent where a neuron switches on).
#
# A *Dense* layer is many neurons side by side, each connected to every input. A 28x28 digit
# flattened to 784 numbers gives each neuron 784 weights and a bias, and the whole layer is
# one matrix product: relu(x W + b). Below, a Dense layer of 4 neurons reads one training
# digit, and one line of NumPy computes the same four numbers.
#
# The weights start *random*: Keras' default (Glorot uniform) draws them from
# -0.087 to 0.087 here, sqrt(6 / (784 + 4)). If they all started equal, every neuron would
# compute the same thing, get the same update and stay a copy of the others forever.

# %%
print("\n## 6. A first network: neurons and Dense layers")
neuron_output = max(0.0, 0.5 * 2 + 1.0 * -1 + 0.5)  # inputs (0.5, 1), weights (2, -1), bias
print(f"one neuron: relu(0.5*2 + 1.0*(-1) + 0.5) = {neuron_output}")
dense_layer = keras.layers.Dense(4, dtype="float32")  # 4 neurons; float32 for an exact check
pixels = x_train[:1].reshape(1, 784)                   # one digit as 784 numbers
keras_sums = keras.ops.convert_to_numpy(dense_layer(pixels))
weights, biases = dense_layer.get_weights()            # shapes (784, 4) and (4,)
numpy_sums = pixels @ weights + biases                 # each neuron: weighted sum + bias
print(f"Dense(4) on one digit, Keras: {np.round(keras_sums[0], 4)}; NumPy: "
      f"{np.round(numpy_sums[0], 4)}; after ReLU: {np.round(np.maximum(numpy_sums[0], 0), 4)}")
print(f"  (the weights start random, from {weights.min():.3f} to {weights.max():.3f}; "
      "`Dense(4, activation=\"relu\")` would do the ReLU too)")

# %% [markdown]
# **A first network.** Stack Dense layers: the 784 pixels, two *hidden* layers (128 and 64
# neurons, ReLU) and an output layer of 10 neurons, one per digit. The output layer's ten sums,
# the *logits* z, become probabilities through *softmax*, p_i = exp(z_i) / (exp(z_1) + ... +
# exp(z_10)): logits (2.0, 1.0, 0.1) become (0.66, 0.24, 0.10), positive and summing to 1.
# (Keras also offers a last layer without softmax plus a loss given `from_logits=True`, which
# does the same maths in one numerically safer step; we keep softmax in the layer so that the
# network's output reads as probabilities.)
#
# Training it takes three Keras calls, the same for every network in this file: `compile`
# (how to measure mistakes, the *loss*: here cross-entropy; and how to improve, the
# *optimizer*: here Adam), `fit` (show it the training images, adjust the weights) and
# `evaluate`. Section 10 explains what happens inside. `fit` works through the training
# images in *batches* (128 images, `batch_size`): each batch gives one *step*, one small
# change of every weight. One pass over all the training images is an *epoch* (54,000 / 128:
# 422 steps). Two epochs take a few seconds and reach about 96% on the validation images.
#
# It has 109,386 parameters, 100,480 of them (784 * 128 + 128) in the first layer: every
# hidden neuron has its own weight for every pixel, and nothing tells it that neighbouring
# pixels belong together. Shift a digit two pixels and every bit of ink meets different
# weights. The next section's convolution fixes both.

# %%
import time

DENSE_EPOCHS = 2


def build_dense_model():
    """No convolutions: Dense layers on the 784 flattened pixels."""
    return keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        keras.layers.Flatten(),                        # (28, 28, 1) -> 784 numbers
        keras.layers.Dense(128, activation="relu"),    # hidden layer 1
        keras.layers.Dense(64, activation="relu"),     # hidden layer 2
        keras.layers.Dense(10, activation="softmax", dtype="float32"),  # 10 probabilities
    ], name="dense_only")


dense_model = build_dense_model()
dense_model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
dense_started = time.perf_counter()
dense_model.fit(x_train, y_train_onehot, batch_size=settings.batch_size, epochs=DENSE_EPOCHS,
                validation_data=(x_val, y_val_onehot), verbose=0)
_, dense_val_accuracy = dense_model.evaluate(x_val, y_val_onehot, verbose=0)
print(f"Dense network: {dense_model.count_params():,} parameters, {DENSE_EPOCHS} epochs in "
      f"{time.perf_counter() - dense_started:.0f} s, validation accuracy {dense_val_accuracy:.2%}")


# %% [markdown]
# ## 7. Convolution, by hand
#
# A *convolution* filter is a small grid of weights, here 3x3 = 9. Laid on a 3x3 patch of the
# image, each weight multiplies the pixel under it and the 9 products are summed. This
# vertical-stroke filter has every row (-1, 2, -1):
#
#     -1  2 -1
#     -1  2 -1
#     -1  2 -1
#
# On a patch with a line of full ink (1) down its middle it gives 2+2+2 = 6; on blank paper
# 0, and on a patch all ink also 0 (6 - 3 - 3): a large output means "my pattern is here".
# The filter slides over every position, one pixel at a time (*stride* 1), and the *same* 9
# weights are used everywhere (*weight sharing*). The outputs form a *feature map*.
#
# * **Output size.** A k x k filter fits in n - k + 1 positions along a side of n pixels:
#   28 - 3 + 1 = 26 (padding `valid`, ours). With stride s it is floor((n - k) / s) + 1.
#   Padding `same` adds a border of zeros so that 28 stay 28.
# * **Channels.** A colour image has 3 channels; after a layer of 32 filters there are 32
#   feature maps. A filter (of a plain Conv2D) spans all input channels: one of the second layer
#   (section 8) has 3 * 3 * 32 = 288 weights and sums over all 32 maps.
# * **Few parameters.** 32 such filters on the digit need 3*3*32 + 32 = 320 parameters. A
#   Dense layer making the same 26 * 26 * 32 = 21,632 outputs from 784 pixels would need
#   784 * 21,632 + 21,632 = 16,981,120.
# * **Cross-correlation.** In mathematics a convolution flips the filter first; Keras (like
#   the other mainstream deep-learning libraries) does not. The network learns its
#   filters, so it does not matter, except when you copy a filter from a textbook.
# * **Equivariance.** Shift the digit 2 pixels and its feature map shifts by the same 2 pixels:
#   the filter finds its stroke anywhere. *Max-pooling* (section 8: keep the largest of each
#   2x2 block) adds a little *invariance*: many pooled values do not change at all when the
#   digit moves by 1 pixel.
#
# The code computes the filter's feature map of one training digit with NumPy, and again with
# a Keras `Conv2D` layer holding the same 9 weights; figure 04 draws both, and the shifts.

# %%
print("\n## 7. Convolution, by hand")
VERTICAL_STROKE = np.array([[-1, 2, -1]] * 3, dtype="float32")


def convolve(image, kernel):
    """Slide the kernel over the image where it fits, one pixel at a time; at each place,
    multiply the pixels under it by its weights and sum them (no flip: cross-correlation)."""
    k = kernel.shape[0]
    size = image.shape[0] - k + 1  # 28 - 3 + 1 = 26
    feature_map = np.zeros((size, size), dtype="float32")
    for row in range(size):
        for col in range(size):
            feature_map[row, col] = np.sum(image[row:row + k, col:col + k] * kernel)
    return feature_map


def max_pool(feature_map):
    """The largest value of each 2x2 block (stride 2): 26x26 -> 13x13."""
    half = feature_map.shape[0] // 2
    return feature_map[:2 * half, :2 * half].reshape(half, 2, half, 2).max(axis=(1, 3))


digit = x_train[0, :, :, 0]
by_hand = convolve(digit, VERTICAL_STROKE)
conv = keras.layers.Conv2D(1, 3, use_bias=False, dtype="float32")  # one 3x3 filter, no bias
conv.build((None, 28, 28, 1))
conv.set_weights([VERTICAL_STROKE.reshape(3, 3, 1, 1)])  # (height, width, in, out channels)
by_keras = keras.ops.convert_to_numpy(conv(x_train[:1]))[0, :, :, 0]
print(f"feature map {by_hand.shape}; NumPy and Keras differ by at most "
      f"{np.abs(by_hand - by_keras).max():.1e}")
shifted = np.roll(digit, 2, axis=1)  # 2 pixels to the right (the digit's border is blank)
map_of_shifted = convolve(shifted, VERTICAL_STROKE)
print("shifted digit -> the same map, shifted:", np.allclose(map_of_shifted[:, 2:],
                                                             by_hand[:, :-2], atol=1e-5))
nudged_map = convolve(np.roll(digit, 1, axis=1), VERTICAL_STROKE)
ink = max_pool(by_hand) > 0
unchanged = np.mean(np.isclose(max_pool(nudged_map), max_pool(by_hand))[ink])
unchanged_unpooled = np.mean(np.isclose(nudged_map, by_hand)[by_hand > 0])
print(f"1-pixel shift: {unchanged:.0%} of the pooled values with ink are unchanged "
      f"(before pooling: {unchanged_unpooled:.0%})")

# %%
def plot_convolution(images_and_maps):
    """Each row: an image, the filter's feature map by NumPy, and by Keras (or shifted)."""
    figure, axes = plt.subplots(2, 4, figsize=(13, 6.6), layout="constrained")
    axes[0, 0].imshow(VERTICAL_STROKE, cmap="gray")
    for (row, col), weight in np.ndenumerate(VERTICAL_STROKE):
        axes[0, 0].text(col, row, f"{weight:g}", ha="center", va="center", color="tab:red")
    axes[1, 0].axis("off")
    for axis, (image, title) in zip(list(axes[0, 1:]) + list(axes[1, 1:]), images_and_maps):
        axis.imshow(image, cmap="gray" if image.shape[0] == 28 else "RdBu_r",
                    **({} if image.shape[0] == 28 else {"vmin": -3, "vmax": 3}))
        axis.set_title(title, fontsize=10)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0, 0].set_title("the filter: vertical strokes", fontsize=10)
    figure.suptitle("Convolution by hand: the same 9 weights at every position "
                    "(red: the filter's pattern is there, blue: the opposite)")
    return figure


save_figure(plot_convolution([
    (digit, "a training digit"), (by_hand, "feature map by NumPy (26x26)"),
    (by_keras, "by Keras' Conv2D: the same"), (shifted, "the digit, 2 pixels right"),
    (map_of_shifted, "its map: shifted by 2 too"), (max_pool(by_hand), "max-pooled: 13x13")]),
    "04_convolution_by_hand.png", settings.output_dir)


# %% [markdown]
# ## 8. The convolutional network
#
# Three blocks of convolution, then the dense classifier of section 6 on what they found:
#
# * **Conv2D + ReLU**: 32, 64 and 128 filters of 3x3. Each block's filters read all the maps
#   of the block before, so they combine strokes into curves, loops and corners.
# * **Max-pooling** keeps the largest value of each 2x2 block, stride 2: width and height
#   halve, rounded down (26 -> 13, 11 -> 5). Each block sees a wider patch of the digit: one
#   value after conv1 depends on 3x3 input pixels (its *receptive field*), after pool1 on 4x4,
#   conv2 8x8, pool2 10x10, conv3 18x18 of the 28x28 image. (The rule: call *spacing* the
#   distance, in input pixels, between two neighbouring values a layer reads: 1 at first,
#   doubled after each pool. A layer of size k adds (k - 1) times that spacing:
#   3, 3 + 1*1 = 4, 4 + 2*2 = 8, 8 + 1*2 = 10, 10 + 2*4 = 18.)
# * **BatchNormalization** rescales each channel to mean 0 and standard deviation 1 (then a
#   learned scale and offset): values (2, 4, 6) have mean 4 and standard deviation 1.63, and
#   become (-1.22, 0, 1.22). This keeps training stable at larger learning rates (section
#   10). In *training* it uses the current batch's mean and variance (the square of the
#   standard deviation); at *test* time it uses moving averages collected during training.
# * **BatchNorm's moving averages** are updated each step (one batch) as
#   average = momentum * average + (1 - momentum) * batch value. (This BatchNorm momentum is
#   not the optimizer's of section 10.) Momentum 0.99 means the average mostly reflects the
#   last 1 / (1 - 0.99) = 100 steps. In a short run that is too slow: after 43 steps (one
#   epoch on 5,400 images, `--train-subset 6000`) 0.99^43 = 65% of the starting guess
#   (mean 0, variance 1) is still in the average, and in one epoch of 422 steps (`--quick`)
#   the weights change so much that the last 100 steps' statistics come from quite different
#   networks. So we use 1 - 10 / steps, kept within [0.5, 0.99]: 0.99 for the default run of
#   4,220 steps, 0.976 for one epoch, 0.767 for 43 steps.
# * **Where BatchNorm goes.** We normalise after the ReLU (Conv-ReLU-BN); the BatchNorm paper
#   put it before (Conv-BN-ReLU). Both are common and both train well. In Conv-BN-ReLU the
#   convolution's bias is redundant (BatchNorm subtracts the mean, bias included, and adds its
#   own offset), so people write `Conv2D(..., use_bias=False)` there. In ours the ReLU sits
#   between them, so the bias still matters.
# * **Dropout** with rate p sets each value to 0 with probability p in training and
#   multiplies the survivors by 1 / (1 - p), so the sum stays the same on average: with
#   p = 0.5, (1, 2, 3, 4) might become (2, 0, 6, 0). At test time it does nothing. The network
#   cannot rely on any single unit, which fights overfitting (memorising the training
#   images; section 14). Ours drops with
#   p = 0.5 after the first Dense layer and p = 0.3 after the second.
# * **Parameters.** A 3x3 convolution with C_in input and C_out output channels has
#   3*3*C_in*C_out weights plus C_out biases; BatchNorm keeps 4 numbers per channel (scale and
#   offset are trained, the two moving averages are not); a Dense layer has inputs*outputs
#   weights plus outputs biases. This network has 250,058 parameters, 59% of them in the
#   first Dense layer. With `padding="same"` the maps would stay larger (28 -> 14 -> 7) and
#   that layer alone would have 7*7*128*128 + 128 = 802,944. *Global average pooling*
#   (`GlobalAveragePooling2D`: one average per channel, 128 numbers) in place of Flatten is
#   the common way to shrink that layer; with our 3x3 maps Flatten still keeps where each
#   feature was found.
#
# "Try this" experiments (change one thing, run `--epochs 1`) and their measured results are
# in README.md, section Exercises: no BatchNorm, no pooling, `padding="same"`, no convolutions.

# %%
print("\n## 8. The convolutional network")


def batchnorm_momentum_for(total_steps):
    """Short runs need faster-moving averages: 1 - 10 / steps, kept within [0.5, 0.99]."""
    return float(np.clip(1.0 - 10.0 / max(total_steps, 1), 0.5, 0.99))


def build_model(batchnorm_momentum=0.99, padding="valid", batchnorm=True, pooling=True,
                dropout=True):
    """The network. The keyword arguments are for the experiments in README's Exercises."""
    def conv_block(filters, name, pool):
        block = [keras.layers.Conv2D(filters, 3, padding=padding, activation="relu",
                                     name=f"conv{name}")]
        if batchnorm:
            block.append(keras.layers.BatchNormalization(momentum=batchnorm_momentum,
                                                         name=f"bn{name}"))
        if pool and pooling:
            block.append(keras.layers.MaxPooling2D(2, name=f"pool{name}"))
        return block
    def dropout_layer(rate, name):
        return [keras.layers.Dropout(rate, name=name)] if dropout else []
    return keras.Sequential([
        keras.Input(shape=(28, 28, 1), name="digit"),
        # Block 1: 32 filters see 3x3 patches of the raw pixels.
        *conv_block(32, 1, pool=True),
        # conv1 -> (26, 26, 32), params 3*3*1*32 + 32 = 320
        # bn1 -> (26, 26, 32), params 4*32 = 128
        # pool1 -> (13, 13, 32), params 0
        # Block 2: 64 filters, each looking at all 32 maps of block 1.
        *conv_block(64, 2, pool=True),
        # conv2 -> (11, 11, 64), params 3*3*32*64 + 64 = 18496
        # bn2 -> (11, 11, 64), params 4*64 = 256
        # pool2 -> (5, 5, 64), params 0
        # Block 3: 128 filters, each seeing 18x18 pixels of the digit; no pooling after it.
        *conv_block(128, 3, pool=False),
        # conv3 -> (3, 3, 128), params 3*3*64*128 + 128 = 73856
        # bn3 -> (3, 3, 128), params 4*128 = 512
        # Classifier: from feature maps to a decision.
        keras.layers.Flatten(name="flatten"),
        # flatten -> (1152,), params 0
        keras.layers.Dense(128, activation="relu", name="dense1"),
        # dense1 -> (128,), params 1152*128 + 128 = 147584
        *dropout_layer(0.5, "dropout1"),
        # dropout1 -> (128,), params 0
        keras.layers.Dense(64, activation="relu", name="dense2"),
        # dense2 -> (64,), params 128*64 + 64 = 8256
        *dropout_layer(0.3, "dropout2"),
        # dropout2 -> (64,), params 0
        # 10 probabilities that sum to 1; kept in float32 even under mixed precision.
        keras.layers.Dense(10, activation="softmax", dtype="float32", name="output"),
        # output -> (10,), params 64*10 + 10 = 650
    ], name="mnist_cnn")
    # Total params 250,058: 249,610 trainable, 448 non-trainable (BatchNorm's moving averages)


steps_per_epoch = math.ceil(len(x_train) / settings.batch_size)
total_steps = steps_per_epoch * settings.epochs
with build_scope():  # several devices: one copy of the model on each; one device: no change
    cnn = build_model(batchnorm_momentum_for(total_steps))
cnn.summary()
print(f"BatchNorm momentum {batchnorm_momentum_for(total_steps):.3f} for {total_steps:,} steps")


# %% [markdown]
# ## 9. Data augmentation, as a layer
#
# People do not write every 7 in the same spot, at the same slant or the same size. If each
# training image is shifted by up to 2 pixels in each direction, rotated by up to 8 degrees
# and scaled by a factor from 0.9 to 1.1, at random and anew every time it is shown, the
# network sees plausible new digits all the time and has a harder time memorising the
# training images (overfitting, section 14). Validation and test images are never augmented.
#
# The augmentation is a Keras layer in front of the network, active only in training, like
# dropout. Each output pixel asks "where did I come from?" (shift back, rotate back, shrink or
# grow back) and mixes the four input pixels around that point (bilinear interpolation): a shift
# of 0.5 pixel to the right makes each pixel the average of itself and its left neighbour. All
# three moves are one *affine transform* per image, so the layer draws a random angle, zoom and
# shift for each image and makes one `keras.ops.image.affine_transform` call (its 8 numbers per
# image: a 2x2 rotation-and-scale matrix, an offset, and two zeros for perspective, which an
# affine transform does not use; they send each output pixel back to the input point it reads.
# The figure shows what they do, so the algebra can wait.) Keras' own layers do the same job in
# three transforms, with other defaults; on JAX they made an epoch far slower (README,
# Augmentation):
#
#     keras.Sequential([keras.layers.RandomTranslation(2 / 28, 2 / 28, fill_mode="constant"),
#                       keras.layers.RandomRotation(8 / 360, fill_mode="constant"),
#                       keras.layers.RandomZoom(0.1, fill_mode="constant")])
#
# Training uses `model`: the augmentation, then the network `cnn`. Outside training the
# augmentation does nothing, so evaluating `model` is evaluating `cnn`; the figures and the
# saved file use `cnn` alone.
#
# Augmentation is not free: it hurt a 1-epoch run in our measurements and helped a 10-epoch one
# (README, Augmentation). So only runs of `augment_min_epochs` (5) epochs or more use it.

# %%
print("\n## 9. Data augmentation, as a layer")


def shift_rotate_zoom_transforms(angle, zoom, shift_x, shift_y, size):
    """Affine transforms (one row of 8 numbers per image, as keras.ops.image.affine_transform
    wants them): output pixel (x, y) reads the input at (a0 x + a1 y + a2, b0 x + b1 y + b2)."""
    ops = keras.ops
    cos, sin = ops.cos(angle) / zoom, ops.sin(angle) / zoom  # zoom 1.1: look 1/1.1 as far out
    centre = (size - 1) / 2
    x0, y0 = centre + shift_x, centre + shift_y  # where the image's centre moves to
    zero = ops.zeros_like(cos)
    return ops.stack([cos, sin, centre - cos * x0 - sin * y0,
                      -sin, cos, centre + sin * x0 - cos * y0, zero, zero], axis=1)


class RandomShiftRotateZoom(keras.layers.Layer):
    """In training, each image rotated, shifted and zoomed at random (one affine transform
    per image); at test time, images pass unchanged."""

    def __init__(self, max_degrees, max_shift, max_zoom, seed=None, **kwargs):
        super().__init__(dtype="float32", **kwargs)  # float32 even under mixed precision
        self.max_degrees, self.max_shift, self.max_zoom = max_degrees, max_shift, max_zoom
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):
        if not training:
            return images
        count = keras.ops.shape(images)[0]

        def uniform(limit):  # one random number per image, from -limit to +limit
            return keras.random.uniform((count,), -limit, limit, seed=self.seed_generator)
        transforms = shift_rotate_zoom_transforms(
            uniform(math.radians(self.max_degrees)), 1 + uniform(self.max_zoom),
            uniform(self.max_shift), uniform(self.max_shift), images.shape[1])
        return keras.ops.image.affine_transform(images, transforms, interpolation="bilinear",
                                                fill_mode="constant")


# %%
def plot_augmentation(images, augmentation, note="", copies=7):
    """Each row: one training digit, then random augmented versions of it."""
    figure, axes = plt.subplots(len(images), copies + 1, layout="constrained",
                                figsize=(1.4 * (copies + 1), 1.7 * len(images)))
    for row, image in enumerate(images):
        show_digit(axes[row, 0], image, "original" if row == 0 else None)
        copies_of_image = np.repeat(image[np.newaxis], copies, axis=0)
        augmented = keras.ops.convert_to_numpy(augmentation(copies_of_image, training=True))
        for axis, copy in zip(axes[row, 1:], augmented):
            show_digit(axis, copy, "augmented" if row == 0 else None)
    figure.suptitle(f"Augmentation: random shifts (up to {augmentation.max_shift:g} px each "
                    f"way), rotations (up to {augmentation.max_degrees:g} degrees) and zooms "
                    f"(up to {augmentation.max_zoom:.0%}), new every time" + note)
    return figure


augment_settings = (settings.max_rotation, settings.max_shift, settings.max_zoom)
use_augmentation = settings.epochs >= settings.augment_min_epochs and any(augment_settings)
print(f"augmentation: {'on' if use_augmentation else 'off'} "
      f"({settings.epochs} epoch(s); on from {settings.augment_min_epochs})")
shown = augment_settings if any(augment_settings) else tuple(
    SETTINGS[name][0] for name in ("max_rotation", "max_shift", "max_zoom"))
save_figure(plot_augmentation(x_train[:3], RandomShiftRotateZoom(*shown, seed=settings.seed),
                              "" if use_augmentation else "\n(not used in this run)"),
            "05_augmentation.png", settings.output_dir)
model = cnn  # what training will fit: the network itself, or the augmentation, then it
if use_augmentation:
    with build_scope():
        model = keras.Sequential([keras.Input(shape=(28, 28, 1)),
                                  RandomShiftRotateZoom(*augment_settings, seed=settings.seed),
                                  cnn], name="augmented_cnn")


# %% [markdown]
# ## 10. How a network learns: loss, gradients, Adam, the learning rate
#
# **Loss.** One number saying how wrong the network is on a batch of images. *Categorical
# cross-entropy* is -ln(probability given to the right digit): 0.9 costs 0.105, 0.5 costs
# 0.693, 0.1 costs 2.303.
#
# **Gradients.** The *gradient* says, for every weight, how the loss changes if that weight
# grows a little. Keras computes all 249,610 (the trainable ones) at once by
# *backpropagation*: the chain rule of
# calculus, applied layer by layer from the loss back to the first convolution. A training
# *step* moves each weight a little against its gradient: new weight = weight - learning
# rate * gradient (weight 0.5, gradient 2, learning rate 0.01: 0.5 - 0.02 = 0.48). Each step
# uses one *batch* of 128 images; 54,000 training images make 422 steps (the last batch has
# 112 images), one *epoch*; the default run is 10 epochs, 4,220 steps.
#
# **Adam** is gradient descent that scales each weight's step to about the learning rate,
# however large or small that weight's gradients are. How: it keeps, per weight, a running
# average of its gradients (factor 0.9: about the last 10 steps) and of their squares (0.999:
# about the last 1,000), and divides the first by the square root of the second. So each
# weight usually moves by about the learning rate per step or less, whether its gradients
# are near 0.001 or near 1,000, and by less when its gradients disagree from step to step.
#
# **Loss and metric.** The loss is what training optimizes: it is smooth, so it has a
# gradient. *Accuracy*, the share of images whose most probable digit is right, is what
# people read; it is a count, with no useful gradient. We print both.
#
# **Before training**, every digit is about equally likely, so the loss should be about
# -ln(1/10) = ln 10 = 2.30. Checking that is cheap, and a very different number means a bug.
#
# **Label smoothing** (0.1 here) softens the one-hot target to 0.9 * one-hot + 0.1 / 10: 0.91
# for the right digit and 0.01 for each other one. The network is never pushed to be 100%
# sure, which makes it less eager to memorise single images. The lowest possible loss is then
# no longer 0 but the loss of predicting exactly the target, -(0.91 ln 0.91 + 9 * 0.01 ln
# 0.01) = 0.50. (Before training it is still ln 10: a uniform 0.1 costs -ln 0.1 whatever the
# target.) Keras' `sparse_categorical_crossentropy` takes integer labels instead of one-hot
# ones and is the same maths, but only without smoothing: it cannot smooth.
#
# **The learning rate** changes during the run:
#
# * **Warm-up** (the first 30% of the steps): the weights are random and Adam's averages are
#   poor, so big steps can throw training off. The rate ramps from a tenth of the peak, 6e-4,
#   up to 6e-3, six times Keras' default of 1e-3, over the first 1,266 of 4,220 steps.
# * **Cosine decay** (the rest): large steps explore early; small steps at the end settle
#   into a good minimum instead of bouncing around it. The rate follows half a cosine: 3e-3
#   halfway through the decay (step 2,743), practically zero at the last step. Defined over
#   the *total* number of steps, the same recipe fits any run length. Figure 06 draws it.

# %%
print("\n## 10. How a network learns: loss, gradients, Adam, the learning rate")


def make_learning_rate_schedule(total_steps, peak_learning_rate, warmup_fraction):
    warmup_steps = max(1, int(total_steps * warmup_fraction))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak_learning_rate / 10,  # start of the warm-up
        warmup_target=peak_learning_rate,               # reached after warmup_steps
        warmup_steps=warmup_steps,
        decay_steps=max(1, total_steps - warmup_steps),  # then a half cosine down to 0
        alpha=0.0)


def lowest_possible_loss(label_smoothing, classes=10):
    """The loss of predicting exactly the smoothed target: 0 without smoothing, 0.50 with 0.1."""
    if label_smoothing == 0:
        return 0.0
    right, other = 1 - label_smoothing + label_smoothing / classes, label_smoothing / classes
    return -(right * math.log(right) + (classes - 1) * other * math.log(other))


schedule = make_learning_rate_schedule(total_steps, settings.peak_learning_rate,
                                       settings.warmup_fraction)
with build_scope():
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=schedule),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing),
        metrics=["accuracy"], jit_compile=JIT_COMPILE)
untrained_loss, untrained_accuracy = model.evaluate(x_val, y_val_onehot, batch_size=512,
                                                    verbose=0)
loss_floor = lowest_possible_loss(settings.label_smoothing)
print(f"Untrained: loss {untrained_loss:.2f} (ln 10 = {math.log(10):.2f}), "
      f"accuracy {untrained_accuracy:.1%} (chance: 10%). Lowest possible loss with label "
      f"smoothing {settings.label_smoothing:g}: {loss_floor:.2f}")


# %% [markdown]
# ## 11. Train
#
# One call trains: `model.fit(x_train, y_train_onehot, batch_size=128, epochs=10,
# validation_data=(x_val, y_val_onehot), callbacks=[...])`. Each epoch shows every training
# image once, in a new random order, then Keras measures loss and accuracy on the validation
# images. A *callback* is code Keras calls at set points, such as after each epoch. We use
# Keras' `EarlyStopping` only to remember the best validation epoch's weights and put them
# back at the end (`restore_best_weights=True`): with `patience` as long as the run, it never
# ends training early. (`ModelCheckpoint(path, save_best_only=True)` keeps them in a file.) With the
# learning rate decaying to zero the best epoch is usually one of the last.
#
# Press Ctrl-C (in a notebook: Interrupt) to stop training early: the step under way finishes,
# the weights are checked on the validation images once more, the best weights so far are kept
# and the rest of the lesson runs on them. A second Ctrl-C ends the run.
#
# The default run reaches about 99.5% test accuracy; README.md (Results) shows what each part
# of the recipe added, over three seeds.

# %%
print("\n## 11. Train")
import csv



def train(model, x, y, validation_data, epochs, batch_size, extra_callbacks=()):
    """model.fit, keeping the best validation epoch's weights. Ctrl-C stops training after the
    current step; a second Ctrl-C ends the run. Returns (history, best epoch, seconds,
    interrupted)."""
    keep_best = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max",
                                              patience=epochs, restore_best_weights=True)
    pressed = []

    def stop_after_this_step(signal_number, frame):
        """Not a KeyboardInterrupt in the middle of a training step: with XLA on TensorFlow
        that corrupted memory here ("free(): invalid next size"). Keras checks stop_training
        after each step, then validates and calls on_train_end, which restores the best."""
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)
        model.stop_training = True

    previous_handler = signal.signal(signal.SIGINT, stop_after_this_step)
    started = time.perf_counter()
    try:
        history = model.fit(x, y, batch_size=batch_size, epochs=epochs,
                            validation_data=validation_data,
                            callbacks=[keep_best, *extra_callbacks],
                            verbose="auto" if IN_NOTEBOOK else 2)
    finally:
        signal.signal(signal.SIGINT, previous_handler or signal.default_int_handler)
    if pressed:
        print(f"\nTraining interrupted by Ctrl-C in epoch {len(history.history['loss'])}. "
              f"Keeping the best weights so far (epoch {keep_best.best_epoch + 1}); the lesson "
              "goes on with them. Ctrl-C again to stop.")
    return history.history, keep_best.best_epoch + 1, time.perf_counter() - started, bool(pressed)


def write_csv(path, header, rows):
    """A CSV file, written atomically (history.csv here, predictions.csv in section 23)."""
    def write(temporary_path):
        with open(temporary_path, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([header, *rows])
    write_atomically(path, write)


print(f"Training for {settings.epochs} epoch(s) of {steps_per_epoch} steps on {DEVICE} "
      "(Ctrl-C stops early and keeps the best weights)...")
history, best_epoch, training_seconds, interrupted = train(
    model, x_train, y_train_onehot, (x_val, y_val_onehot), settings.epochs, settings.batch_size)
best_val_accuracy = max(history["val_accuracy"])
print(f"Trained in {training_seconds:.1f} s; best validation accuracy {best_val_accuracy:.4f} at "
      f"epoch {best_epoch} (those weights are kept)")
write_csv(os.path.join(settings.output_dir, "history.csv"), ["epoch", *history],
          [[epoch + 1, *(f"{values[epoch]:.6f}" for values in history.values())]
           for epoch in range(len(history["loss"]))])


# %% [markdown]
# ## 12. Where the maths ran: backend, device, precision, compilation
#
# (Background for running faster; nothing later depends on it.) Keras describes the network; a
# *backend* library does the arithmetic: TensorFlow (the default), JAX or PyTorch. The same file
# runs on all three. Choose one by setting `KERAS_BACKEND` before Keras is imported: in a shell,
# `KERAS_BACKEND=jax python cnn_mnist_classifier.py`; in Colab, put
# `import os; os.environ["KERAS_BACKEND"] = "jax"` in the first cell (after Runtime > Restart
# session if Keras was already imported).
#
# A GPU makes training many times faster; the setup cell finds one on its own. On a GPU it also
# uses *mixed precision*: the layers (all but the output and the augmentation) compute in 16-bit
# floats, which a GPU's tensor cores multiply much faster, while the weights stay in 32-bit
# floats and the loss is scaled up while the gradients are computed so that small ones do not
# round to zero. And it *compiles* the training step (XLA on TensorFlow and JAX, `torch.compile`
# on PyTorch), fusing many small operations into fewer GPU programs. With several GPUs,
# TensorFlow's `MirroredStrategy` and JAX's `keras.distribution.DataParallel` put a copy of the
# model on each and split every batch between them (PyTorch: one device in this file). On a CPU:
# float32, and compilation only on JAX, where it was faster (README, Backends).

# %%
print("\n## 12. Where the maths ran: backend, device, precision, compilation")
epochs_done = len(history["loss"])  # fewer than asked for after Ctrl-C
print(f"This run: Keras {keras.__version__} on {BACKEND}, {DEVICE}, {PRECISION}, compiled "
      f"{'on' if model.jit_compile else 'off'}: {training_seconds / epochs_done:.1f} s per epoch")
if "GPU" not in DEVICE:
    print("  (no GPU found; in Colab choose Runtime > Change runtime type > GPU for a much "
          "faster run)")


# %% [markdown]
# ## 13. The training history
#
# Training accuracy is usually *below* validation accuracy here, for three reasons: dropout
# is on during training and off for validation; the training number is the mean over the
# whole epoch, while the weights kept improving, and the validation number is measured at
# the epoch's end; BatchNorm uses each batch's own statistics in training and its moving
# averages for validation. (In runs of 5+ epochs augmentation adds harder training images.)
# With label smoothing both losses end a little above its floor of 0.50 (section 10; the
# dashed line), not near 0; the run prints where they ended. If the validation loss rose
# while the training loss kept falling, the network would be memorising: the next section
# shows what that looks like.

# %%
print("\n## 13. The training history")


def plot_curves(axes, history, marker="o-"):
    """Accuracy and loss per epoch, training and validation."""
    epochs = np.arange(1, len(history["loss"]) + 1)
    for axis, metric in zip(axes, ("accuracy", "loss")):
        axis.plot(epochs, history[metric], marker, label="training")
        axis.plot(epochs, history[f"val_{metric}"], marker, label="validation")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()


def plot_history(history, best_epoch, schedule, total_steps, steps_per_epoch, loss_floor=0.0):
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    plot_curves(axes[:2], history)
    if loss_floor > 0:
        axes[1].axhline(loss_floor, color="tab:green", linestyle="--",
                        label=f"floor {loss_floor:.2f} (label smoothing)")
    for axis, corner in zip(axes[:2], ("lower right", "upper right")):  # where curves are not
        axis.axvline(best_epoch, color="gray", linestyle=":", label="best validation (kept)")
        axis.set_xticks(np.arange(1, len(history["loss"]) + 1))
        axis.legend(loc=corner, fontsize=8, framealpha=0.6)  # points show through
    axes[0].set_title("accuracy (training: mean over the epoch, dropout on)", fontsize=10)
    steps = np.unique(np.linspace(0, total_steps - 1, 200).astype(int))
    axes[2].plot(steps / steps_per_epoch, [float(schedule(step)) for step in steps])
    axes[2].set_xlabel("epoch")
    axes[2].set_title("learning rate: warm-up, then cosine decay")
    axes[2].grid(alpha=0.3)
    return figure


print(f"Last epoch: training loss {history['loss'][-1]:.2f}, validation loss "
      f"{history['val_loss'][-1]:.2f} (lowest possible {loss_floor:.2f})")
save_figure(plot_history(history, best_epoch, schedule, total_steps, steps_per_epoch,
                         loss_floor), "06_training_history.png", settings.output_dir)


# %% [markdown]
# ## 14. Overfitting, shown
#
# A network with enough weights can memorise its training images instead of learning what
# makes a digit. To see it happen: train a fresh copy *without dropout, BatchNorm or
# augmentation* on only 1,000 images for 30 epochs, at Adam's default constant rate. (With
# BatchNorm, whose moving averages remember about 100 steps, such a run of 8 steps per epoch,
# 240 in all, spends most of its time letting them settle, and the validation curve shows
# that instead.) The training accuracy climbs to 100% and its loss towards 0, while the
# validation accuracy stops improving well below 100%, and the validation loss stops falling and,
# after its lowest point, creeps back up: the network keeps getting surer of answers it has
# memorised, including wrong ones. The run prints both accuracies and where the validation
# loss was lowest. The remedies: more data (or augmentation), dropout, *weight decay* (a small
# pull of every weight towards 0 at each step, so that no weight grows large to fit one
# image), and stopping (or keeping the best epoch) when validation stops improving.

# %%
print("\n## 14. Overfitting, shown")
OVERFIT_IMAGES = 1000
OVERFIT_EPOCHS = 30  # 8 with --quick


def overfitting_demo(x_small, y_small, validation_data, epochs, seed):
    keras.utils.set_random_seed(seed)
    small_model = build_model(batchnorm=False, dropout=False)
    small_model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                        metrics=["accuracy"], jit_compile=JIT_COMPILE)
    fitted = small_model.fit(x_small, y_small, batch_size=128, epochs=epochs,
                             validation_data=validation_data, verbose=0)
    return fitted.history


def plot_overfitting(history, image_count):
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot_curves(axes, history, marker=".-")
    figure.suptitle(f"Overfitting: {image_count:,} training images, no dropout, BatchNorm or "
                    "augmentation: where do training and validation part?")
    return figure


overfit_epochs = 8 if settings.quick else OVERFIT_EPOCHS
overfit_started = time.perf_counter()
overfit_history = overfitting_demo(x_train[:OVERFIT_IMAGES], y_train_onehot[:OVERFIT_IMAGES],
                                   (x_val[:2000], y_val_onehot[:2000]), overfit_epochs,
                                   settings.seed)
overfit_seconds = time.perf_counter() - overfit_started
print(f"{OVERFIT_IMAGES:,} images, {overfit_epochs} epochs ({overfit_seconds:.0f} s): training "
      f"accuracy {overfit_history['accuracy'][-1]:.1%}, validation "
      f"{overfit_history['val_accuracy'][-1]:.1%}; validation loss lowest at epoch "
      f"{int(np.argmin(overfit_history['val_loss'])) + 1}, "
      f"{min(overfit_history['val_loss']):.3f} -> {overfit_history['val_loss'][-1]:.3f} at the end")
save_figure(plot_overfitting(overfit_history, OVERFIT_IMAGES), "07_overfitting.png",
            settings.output_dir)


# %% [markdown]
# ## 15. Evaluate on the test set, once
#
# Now, and only now, the 10,000 test images, for the CNN and for section 6's dense network.
# Overall accuracy hides which digits are hard, so we also draw the confusion matrix (row =
# true digit, column = predicted digit; everything off the diagonal is a mistake) and print
# two numbers per digit. *Recall*: of the real 7s, the share read as 7 (the matrix's row).
# *Precision*: of everything read as 7, the share that really is a 7 (its column). For
# example, if 1,000 of 1,028 sevens are read as 7 and 10 other digits are also read as 7,
# recall is 1000/1028 = 97.3% and precision 1000/1010 = 99.0%.
#
# On 10,000 images one image is 0.01 points, and luck alone moves an accuracy near 99.5% by
# about 0.07 points (its standard error); README (Results) says which differences are real.

# %%
print("\n## 15. Evaluate on the test set, once")


def predict(model, images, batch_size=512):
    """model.predict as NumPy. With several devices every batch is split evenly between
    them, so a batch is padded with blank images to a multiple of the device count."""
    batch_size -= batch_size % DEVICE_COUNT
    extra = -len(images) % DEVICE_COUNT
    padded = np.concatenate([images, np.zeros((extra, *images.shape[1:]), images.dtype)])
    outputs = model.predict(padded, batch_size=batch_size, verbose=0)
    if isinstance(outputs, (list, tuple)):  # a model with several outputs
        return [np.asarray(output)[:len(images)] for output in outputs]
    return np.asarray(outputs)[:len(images)]


def confusion_matrix(true_labels, predicted_labels):
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (true_labels, predicted_labels), 1)
    return matrix


def recall_and_precision(matrix):
    """Per digit: right / all true (row), right / all predicted (column)."""
    right = matrix.diagonal()
    return right / np.maximum(matrix.sum(axis=1), 1), right / np.maximum(matrix.sum(axis=0), 1)


def plot_confusion_matrix(matrix):
    figure, axis = plt.subplots(figsize=(7.5, 6.5))
    shown = np.log1p(matrix)  # a log scale so that small off-diagonal counts are visible
    axis.imshow(shown, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            axis.text(col, row, str(count), ha="center", va="center", fontsize=8,
                      color="white" if shown[row, col] > shown.max() / 2 else "black")
    axis.set_xticks(range(10))
    axis.set_yticks(range(10))
    axis.set_xlabel("predicted digit")
    axis.set_ylabel("true digit")
    axis.set_title(f"Confusion matrix on the test set ({matrix.trace():,} of {matrix.sum():,} "
                   "right)")
    return figure


# %%
y_test_onehot = keras.utils.to_categorical(y_test, 10)
test_loss, test_accuracy = model.evaluate(x_test, y_test_onehot, batch_size=512, verbose=0)
_, dense_test_accuracy = dense_model.evaluate(x_test, y_test_onehot, batch_size=512, verbose=0)
test_probabilities = predict(cnn, x_test)
test_predictions = test_probabilities.argmax(axis=1)
matrix = confusion_matrix(y_test, test_predictions)
recall, precision = recall_and_precision(matrix)
error_count = int((test_predictions != y_test).sum())
print(f"Test accuracy {test_accuracy:.4f} (loss {test_loss:.4f}); errors {error_count} of "
      f"{len(y_test):,}. The dense network of section 6: {dense_test_accuracy:.4f}")
print("digit      " + " ".join(f"{digit:>6}" for digit in range(10)))
print("recall     " + " ".join(f"{value:6.1%}" for value in recall))
print("precision  " + " ".join(f"{value:6.1%}" for value in precision))
save_figure(plot_confusion_matrix(matrix), "08_confusion_matrix.png", settings.output_dir)


# %% [markdown]
# ## 16. Predictions, and what "confidence" means
#
# The network's output is 10 probabilities; the prediction is the largest, and its value is
# called the *confidence*. Green titles are right, red are wrong. The bar charts show all ten
# probabilities for the first few right and the first few wrong answers. A confident answer
# is not always a correct one: section 19 shows mistakes made with high confidence.
#
# Label smoothing (section 10) shows here: the network was trained towards 0.91 for the right
# digit, so even a perfectly clear digit gets about that, not 1.00. That target was aimed at
# with dropout (and augmentation) on; at test time both are off, so the outputs come out a
# little surer, a little above 0.91. The run prints the right answers' median and highest
# confidence, and the wrong answers' median. (Try
# `--label-smoothing 0` and compare the bars in figure 10.)

# %%
print("\n## 16. Predictions, and what \"confidence\" means")


def plot_prediction_grid(images, true_labels, probabilities, count=24):
    figure, axes = plt.subplots(3, count // 3, figsize=(count // 3 * 1.45, 5.4))
    for axis, image, label, probs in zip(axes.flat, images, true_labels, probabilities):
        predicted = int(np.argmax(probs))
        show_digit(axis, image, f"pred {predicted} ({probs[predicted]:.0%})\ntrue {label}",
                   color="green" if predicted == label else "red")
    figure.suptitle("Test predictions: green right, red wrong")
    return figure


def pick_examples(true_labels, predictions, right=3, wrong=3):
    """Indices of the first few right and first few wrong predictions."""
    right_idx = np.flatnonzero(predictions == true_labels)[:right]
    wrong_idx = np.flatnonzero(predictions != true_labels)[:wrong]
    return np.concatenate([right_idx, wrong_idx]).astype(int)


def show_probabilities(axis, probabilities, color="tab:blue", title=None):
    """The ten probabilities as bars, the predicted digit's bar in `color`."""
    bars = axis.bar(range(10), probabilities, color="lightgray")
    bars[int(np.argmax(probabilities))].set_color(color)
    axis.set_ylim(0, 1)
    axis.set_xticks(range(10))
    axis.tick_params(labelsize=7)
    if title is not None:
        axis.set_title(title, fontsize=9)


def plot_probability_bars(images, probabilities, titles, colors):
    count = len(images)
    figure, axes = plt.subplots(2, count, figsize=(2.3 * count, 4.6), squeeze=False)
    for column, (image, probs, title, color) in enumerate(zip(images, probabilities, titles,
                                                              colors)):
        show_digit(axes[0, column], image, title, color)
        show_probabilities(axes[1, column], probs, color)
    axes[1, 0].set_ylabel("probability")
    figure.suptitle("All ten probabilities: the first right and the first wrong test images")
    return figure


def example_titles(indices):
    return ([f"true {y_test[i]}, pred {test_predictions[i]}" for i in indices],
            ["green" if test_predictions[i] == y_test[i] else "red" for i in indices])


# %%
confidence = test_probabilities.max(axis=1)
right_answers = test_predictions == y_test
print(f"Confidence of the right answers: median {np.median(confidence[right_answers]):.3f}, "
      f"highest {confidence[right_answers].max():.3f}; of the wrong answers: median "
      f"{np.median(confidence[~right_answers]) if error_count else float('nan'):.2f}")
save_figure(plot_prediction_grid(x_test, y_test, test_probabilities), "09_predictions.png",
            settings.output_dir)
examples = pick_examples(y_test, test_predictions)
save_figure(plot_probability_bars(x_test[examples], test_probabilities[examples],
                                  *example_titles(examples)), "10_confidence.png",
            settings.output_dir)


# %% [markdown]
# ## 17. What the network learned: filters and feature maps
#
# The 32 first-layer filters are 3x3 weight patterns like section 7's (light = positive,
# dark = negative); many are edge and stroke detectors at different angles. A *feature map*
# is one filter's response over the whole image; we show, for one test digit, the 8 maps of
# each block that respond most strongly. After block 1 the maps still look like the digit;
# after block 3 they are 3x3 and abstract: "is there a loop at the top?" rather than pixels.

# %%
print("\n## 17. What the network learned: filters and feature maps")


def plot_first_layer_filters(cnn):
    kernels = cnn.get_layer("conv1").get_weights()[0][:, :, 0, :]  # (3, 3, 1, 32) -> 3x3x32
    limit = np.abs(kernels).max()
    figure, axes = plt.subplots(4, 8, figsize=(9, 4.8))
    for index, axis in enumerate(axes.flat):
        axis.imshow(kernels[:, :, index], cmap="gray", vmin=-limit, vmax=limit)
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(f"filter {index}", fontsize=8)
    figure.suptitle("All 32 first-layer 3x3 filters (light positive, dark negative)")
    return figure


def block_outputs(cnn):
    """The last layer of each convolution block (pool1, pool2, bn3 in our network)."""
    names = [layer.name for layer in cnn.layers]
    return [[name for name in names if name in (f"conv{b}", f"bn{b}", f"pool{b}")][-1]
            for b in (1, 2, 3)]


def feature_maps(cnn, image):
    """Each block's output for one image: a list of (height, width, channels) arrays."""
    probe = keras.Model(cnn.inputs[0], [cnn.get_layer(name).output
                                        for name in block_outputs(cnn)])
    return [np.asarray(maps, dtype="float32")[0] for maps in predict(probe, image[np.newaxis])]


def plot_feature_maps(cnn, image, channels=8):
    """The `channels` most active maps of each block (largest mean value) for one image."""
    figure, axes = plt.subplots(3, channels + 1, figsize=(1.5 * (channels + 1), 5.2))
    for row, (name, maps) in enumerate(zip(block_outputs(cnn), feature_maps(cnn, image))):
        show_digit(axes[row, 0], image, "input" if row == 0 else None)
        axes[row, 0].set_ylabel(f"{name}\n{'x'.join(map(str, maps.shape))}", fontsize=9)
        for axis, channel in zip(axes[row, 1:], np.argsort(-maps.mean(axis=(0, 1)))):
            axis.imshow(maps[:, :, channel], cmap="viridis")
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(f"map {channel}", fontsize=8)
    figure.suptitle(f"Feature maps after each block: the {channels} most active of each")
    return figure


save_figure(plot_first_layer_filters(cnn), "11_filters.png", settings.output_dir)
save_figure(plot_feature_maps(cnn, x_test[0]), "12_feature_maps.png", settings.output_dir)


# %% [markdown]
# ## 18. Which pixels matter: occlusion maps
#
# Cover part of the digit and see whether the network changes its mind. We slide a 6x6 patch of
# background over the image, 2 pixels at a time, and record how much the probability of the
# predicted digit drops at each position; red = covering this part made the network much less
# sure. It needs only predictions, so it works the same on every backend. Read it as "the network
# *used* this ink": covering background changes nothing, so the map cannot show ink that is
# *missing* (the open top of a 4). It has caveats of its own: a covered digit is unlike any
# training digit, and the patch size and fill value change the map. Gradient maps (how much the
# output changes with each pixel, from backpropagation; Guided Backprop and Grad-CAM are two
# variants) are the popular alternative; Adebayo et al. (2018, "Sanity checks for saliency maps")
# found that some of them (Guided Backprop, Guided Grad-CAM) look much the same even for a
# network with random weights, while plain gradients pass that test.

# %%
print("\n## 18. Which pixels matter: occlusion maps")


def occlusion_maps(model, images, classes, patch=6, stride=2):
    """For each image: the drop in its class's probability when a patch x patch square is
    set to background, averaged over every placement covering each pixel; (N, 28, 28)."""
    size = images.shape[1]
    corners = [(top, left) for top in range(0, size - patch + 1, stride)
               for left in range(0, size - patch + 1, stride)]
    maps = np.zeros(images.shape[:3], np.float32)
    for number, (image, digit) in enumerate(zip(images, classes)):
        covered = np.repeat(image[np.newaxis], len(corners), axis=0)
        for copy, (top, left) in zip(covered, corners):
            copy[top:top + patch, left:left + patch] = 0.0
        probabilities = predict(model, np.concatenate([image[np.newaxis], covered]), 512)
        drops = probabilities[0, digit] - probabilities[1:, digit]
        total, counts = np.zeros((size, size), np.float32), np.zeros((size, size), np.float32)
        for drop, (top, left) in zip(drops, corners):
            total[top:top + patch, left:left + patch] += drop
            counts[top:top + patch, left:left + patch] += 1
        maps[number] = total / np.maximum(counts, 1)
    return maps


def plot_occlusion(images, maps, titles, colors):
    count = len(images)
    figure, axes = plt.subplots(2, count, figsize=(2.0 * count, 4.4), squeeze=False)
    for column in range(count):
        show_digit(axes[0, column], images[column], titles[column], colors[column])
        show_digit(axes[1, column], images[column])
        limit = max(float(np.abs(maps[column]).max()), 1e-3)
        axes[1, column].imshow(maps[column], cmap="bwr", vmin=-limit, vmax=limit, alpha=0.6)
        axes[1, column].set_xlabel(f"largest mean drop {maps[column].max():.0%}", fontsize=8)
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("occlusion")
    figure.suptitle("Covering which part changes the answer? Red: the predicted digit's "
                    "probability drops (blue: rises)")
    return figure


occlusion_examples = pick_examples(y_test, test_predictions, right=5, wrong=3)
maps = occlusion_maps(cnn, x_test[occlusion_examples], test_predictions[occlusion_examples])
save_figure(plot_occlusion(x_test[occlusion_examples], maps, *example_titles(occlusion_examples)),
            "13_occlusion.png", settings.output_dir)


# %% [markdown]
# ## 19. The most confident mistakes
#
# Sorting the errors by confidence finds the interesting ones: badly written digits, a few
# wrongly labelled ones, and real weaknesses. The most confused pairs are digits that look
# alike; the run prints them below.

# %%
print("\n## 19. The most confident mistakes")


def most_confident_mistakes(true_labels, probabilities, count=12):
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != true_labels)
    return wrong[np.argsort(-probabilities[wrong].max(axis=1))][:count]


def most_confused_pairs(matrix, count=3):
    off_diagonal = matrix.copy()
    np.fill_diagonal(off_diagonal, 0)
    order = np.argsort(-off_diagonal, axis=None)[:count]
    return [(int(true), int(predicted), int(off_diagonal[true, predicted]))
            for true, predicted in zip(*np.unravel_index(order, matrix.shape))
            if off_diagonal[true, predicted] > 0]


def plot_mistakes(images, true_labels, probabilities, indices, columns=6):
    rows = max(1, math.ceil(len(indices) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 2.3), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, indices):
        predicted, truth = int(np.argmax(probabilities[index])), int(true_labels[index])
        show_digit(axis, images[index], f"true {truth} ({probabilities[index][truth]:.0%})\n"
                   f"pred {predicted} ({probabilities[index][predicted]:.0%})", color="red")
    figure.suptitle("The most confident mistakes: true label (its probability), prediction")
    return figure


mistakes = most_confident_mistakes(y_test, test_probabilities)
print(f"{error_count} mistakes in {len(y_test):,} test images. Most confused (true -> "
      "predicted): " + ", ".join(f"{t} -> {p} ({n}x)" for t, p, n in most_confused_pairs(matrix)))
if len(mistakes):
    save_figure(plot_mistakes(x_test, y_test, test_probabilities, mistakes), "14_mistakes.png",
                settings.output_dir)


# %% [markdown]
# ## 20. Save the model, reload it, check it
#
# We save the network `cnn`, not the training-time augmentation in front of it. The `.keras`
# format stores the architecture and the weights in one file (and the optimizer's state when
# the saved model is the one that was compiled), the same for every backend: a model saved
# with TensorFlow loads with JAX or PyTorch. We load it back as a
# user would and check that it predicts the same: the same digits exactly, and probabilities
# equal up to rounding (float32 arithmetic rounds in the 7th digit, float16 in the 3rd, so the
# allowed difference depends on the precision).
#
# A model file is a program's description, so only load files from people you trust.
# `keras.saving.load_model` runs in *safe mode* by default: it refuses to deserialize
# arbitrary Python code (such as a `Lambda` layer's function). That closes the most obvious
# hole, not every one: Keras releases have had safe-mode bypasses fixed. So requirements.txt
# asks for Keras 3.14 or newer; with an older Keras (a notebook's own, say) this run warns,
# and `--predict` refuses to load a model file at all.

# %%
print("\n## 20. Save the model, reload it, check it")
import json

SAFE_KERAS = (3, 14, 0)  # fixed a safe-mode bypass (CVE-2026-1462) and a path traversal


def keras_too_old():
    """A one-line problem if this Keras is older than SAFE_KERAS, else None."""
    version = tuple(int(part) for part in re.findall(r"\d+", keras.__version__)[:3])
    if version >= SAFE_KERAS:
        return None
    return (f"Keras {keras.__version__} is older than 3.14.0, which fixed a safe-mode bypass "
            "(CVE-2026-1462) and a path traversal (GHSA-hqp4-2352-xf5r) in loading model "
            "files. Upgrade it: pip install --upgrade \"keras>=3.14\"")


def reload_tolerance(policy):
    return 2e-2 if "16" in policy else 1e-4


def peak_memory_mb():
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)
    except (ImportError, AttributeError):  # Windows has no resource module
        return None


# %%
keras_problem = keras_too_old()  # this run's own model reloads; one from elsewhere would not
if keras_problem:
    print(f"warning: {keras_problem}")
model_path = os.path.join(settings.output_dir, "mnist_cnn.keras")
write_atomically(model_path, cnn.save)  # the plain call is cnn.save(model_path)
reloaded = keras.saving.load_model(model_path)
reloaded_probabilities = predict(reloaded, x_test[:1000])
largest_difference = float(np.abs(reloaded_probabilities - test_probabilities[:1000]).max())
same_digits = bool((reloaded_probabilities.argmax(1) == test_predictions[:1000]).all())
same = same_digits and largest_difference <= reload_tolerance(PRECISION)
print(f"Saved {model_path} ({os.path.getsize(model_path) / 1e6:.1f} MB); reloaded: same digits "
      f"{same_digits}, largest probability difference {largest_difference:.1e} (allowed "
      f"{reload_tolerance(PRECISION):.0e} in {PRECISION}): match {same}")
print(f"  Load it anywhere with: model = keras.saving.load_model({model_path!r})")


# %%
metrics = {  # the run's numbers in one file, for the benchmark and for comparing runs
    "test_accuracy": round(float(test_accuracy), 6), "test_loss": round(float(test_loss), 6),
    "dense_test_accuracy": round(float(dense_test_accuracy), 6),
    "untrained_loss": round(float(untrained_loss), 6),
    "best_val_accuracy": round(float(best_val_accuracy), 6),
    "best_epoch": best_epoch, "epochs": settings.epochs,
    "epochs_completed": epochs_done, "interrupted": interrupted,
    "batch_size": settings.batch_size, "steps_per_epoch": steps_per_epoch,
    "train_images": int(len(x_train)), "validation_images": int(len(x_val)),
    "augmentation": bool(use_augmentation), "training_seconds": round(training_seconds, 2),
    "seconds_per_epoch": round(training_seconds / epochs_done, 2),
    "parameters": int(cnn.count_params()), "backend": BACKEND, "device": DEVICE,
    "precision": PRECISION, "jit_compile": bool(model.jit_compile),  # what Keras did
    "keras_version": keras.__version__, "backend_version": str(sys.modules[BACKEND].__version__),
    "python_version": sys.version.split()[0], "seed": settings.seed, "data_source": DATA_SOURCE,
    "median_right_confidence": round(float(np.median(confidence[right_answers])), 4),
    "overfit_final_train_accuracy": round(float(overfit_history["accuracy"][-1]), 6),
    "overfit_final_val_accuracy": round(float(overfit_history["val_accuracy"][-1]), 6),
    "peak_memory_mb": peak_memory_mb(), "reload_predictions_match": same,
    "reload_largest_difference": largest_difference, "model_path": model_path,
    "model_megabytes": round(os.path.getsize(model_path) / 1e6, 2),
}


def write_json(path, data):
    def write(temporary_path):
        with open(temporary_path, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
    write_atomically(path, write)


write_json(os.path.join(settings.output_dir, "metrics.json"), metrics)
print(f"  metrics: {os.path.join(settings.output_dir, 'metrics.json')}")


# %% [markdown]
# ## 21. Try your own digit
#
# The lesson about networks ends with section 20. Sections 21-23 put the trained network to
# work on your own digits; they are image processing and a little window and web-page code,
# to read when you want them, not to learn networks from.
#
# A phone photo of a digit is nothing like an MNIST image, and shrinking it to 28x28 is not
# enough. Two steps come from MNIST's own recipe (LeCun, Cortes and Burges): each digit was
# scaled to fit a 20x20 box, keeping its aspect ratio, with anti-aliasing (averaging, so
# strokes get soft grey edges), and placed in a 28x28 image so that its *centre of mass*
# falls at (14, 14), where MNIST's centres of mass sit (measured; the geometric middle of
# pixels 0-27 would be 13.5). The steps before them are our clean-up of a photo, which MNIST's
# scanned forms did not need:
#
# 1. **Grey**: colour carries no information about the digit.
# 2. **Polarity**: MNIST measures ink (0 = none). The paper is what surrounds the digit, so
#    a frame along the image's border shows the paper's greys. Ink is darker than the
#    paper's darkest grey (pen) or brighter than its brightest (chalk). Dark ink: invert.
# 3. **Ink only**: estimate the paper's brightness at each pixel and subtract it. On evenly
#    lit paper (a scan, the drawing pad of section 22) that is one grey. Under uneven light it
#    changes across the page, sharply at a shadow's edge. The estimate: after step 2 the ink is
#    brighter than the paper, and a stroke is narrower than a sixth of the image. So replace
#    each pixel by the lowest value in a window that wide around it (the strokes vanish),
#    then by the highest of those in the same window (the paper's light and shadows come
#    back, edges and all). Then keep what stands clearly above the camera's noise, scaled so
#    that the strongest ink is 1.
# 4. **Crop** to the ink, ignoring specks more than half the digit's size away from it, and
#    thicken thin pen strokes towards MNIST's (about 2.9 pixels wide after scaling).
# 5. (MNIST) **Scale** the longer side to 20 pixels (averaging when it shrinks).
# 6. (MNIST) **Centre of mass** at (14, 14) of a 28x28 image.
#
# Below we fake "photos" from test digits (bigger, dark ink on grey paper with a shadow
# across it, noisy, off-centre) and run the recipe on them. In Colab you can upload your own;
# elsewhere run `python cnn_mnist_classifier.py --predict my_digit.jpg` (or a folder).

# %%
print("\n## 21. Try your own digit")
import io
MAX_IMAGE_PIXELS = 25_000_000  # larger images are refused (a 25-megapixel photo is plenty)
WORKING_SIZE = 600             # photos are shrunk to at most this many pixels per side first
MNIST_CENTRE_OF_MASS = 14.0    # measured: MNIST digits' centre of mass is at row 14, column 14
MNIST_STROKE_WIDTH = 2.9       # median of stroke_width(image > 0.5) on the MNIST test digits


class ImageProblem(Exception):
    """An image we cannot read a digit from; the message says why."""


def open_image(path):
    """Open an image file as a PIL image, refusing missing, broken and huge files."""
    try:
        image = Image.open(path)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageProblem(f"image is {width}x{height} = {width * height / 1e6:.0f} "
                               f"megapixels; the limit is {MAX_IMAGE_PIXELS / 1e6:.0f}. "
                               "Shrink or crop it")
        image.load()
    except FileNotFoundError:
        raise ImageProblem("file not found") from None
    except UnidentifiedImageError:
        raise ImageProblem("not an image file PIL can read (use PNG or JPEG)") from None
    except Image.DecompressionBombError:
        raise ImageProblem("image is too large to open safely; shrink or crop it") from None
    except OSError as error:
        raise ImageProblem(f"cannot read the image ({error})") from None
    return ImageOps.exif_transpose(image)  # phone photos store their rotation separately


# %%
def resize_array(array, size, resample=Image.Resampling.BOX):
    """Resize a float image (PIL's "F" mode keeps the grey levels exact)."""
    return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize(size, resample))


def blur(array, sigma):
    """A small Gaussian blur of a float image (Pillow's GaussianBlur takes 8-bit images only)."""
    offsets = np.arange(-math.ceil(3 * sigma), math.ceil(3 * sigma) + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    pad = len(offsets) // 2
    height, width = array.shape
    padded = np.pad(array.astype(np.float32), pad, mode="edge")
    rows = sum(k * padded[:, pad + o: pad + o + width] for k, o in zip(kernel, offsets))
    return sum(k * rows[pad + o: pad + o + height, :] for k, o in zip(kernel, offsets))


def stroke_width(mask):
    """Average stroke width of a binary image: twice the area over the outline length."""
    padded = np.pad(mask, 1)
    inside = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
              & padded[1:-1, :-2] & padded[1:-1, 2:])
    return 2.0 * mask.sum() / max(int((mask & ~inside).sum()), 1)

# %%
def to_grey(image):
    """Step 1: grey values in [0, 1], at most WORKING_SIZE pixels a side (faster, and the
    averaging removes noise). Transparent pixels become background, whatever their colour."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha, luminance = rgba[..., 3], rgba[..., :3] @ np.float32([0.299, 0.587, 0.114])
        opaque = alpha > 0.5
        ink_is_dark = luminance[opaque].mean() < 0.5 if opaque.any() else True
        grey = alpha * luminance + (1.0 - alpha) * (1.0 if ink_is_dark else 0.0)
    else:
        grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    height, width = grey.shape
    scale = min(1.0, WORKING_SIZE / max(height, width))
    if scale < 1.0:
        grey = resize_array(grey, (max(1, round(width * scale)), max(1, round(height * scale))))
    return grey


def ink_up(grey):
    """Step 2: the paper is what surrounds the digit, so take a frame along the border as
    paper. Ink goes beyond the paper's greys: darker than its darkest (pen, pencil) or brighter
    than its brightest (chalk). Dark ink: invert."""
    k = max(1, min(grey.shape) // 20)
    frame = np.concatenate([grey[:k].ravel(), grey[-k:].ravel(),
                            grey[:, :k].ravel(), grey[:, -k:].ravel()])
    paper_darkest, paper_brightest = np.percentile(frame, [5, 95])
    darkest, brightest = np.percentile(grey, [0.1, 99.9])
    beyond_dark, beyond_bright = paper_darkest - darkest, brightest - paper_brightest
    if abs(beyond_dark - beyond_bright) < 0.05:  # ink in the frame too: its median is paper
        ink_is_dark = np.median(frame) > (darkest + brightest) / 2
    else:
        ink_is_dark = beyond_dark > beyond_bright
    return 1.0 - grey if ink_is_dark else grey.copy()


# %%
def running_extreme(array, size, reduce):
    """reduce (np.minimum or np.maximum) over `size` neighbours along each row, in the same
    few passes for any size (van Herk's method; Pillow's MinFilter takes seconds here)."""
    height, width = array.shape
    blocks = -(-(width + size - 1) // size)
    padded = np.pad(array, ((0, 0), (size // 2, blocks * size - width - size // 2)), mode="edge")
    chunks = padded.reshape(height, blocks, size)
    forward = reduce.accumulate(chunks, axis=2).reshape(height, -1)
    backward = reduce.accumulate(chunks[:, :, ::-1], axis=2)[:, :, ::-1].reshape(height, -1)
    return reduce(backward[:, :width], forward[:, size - 1:size - 1 + width])


def paper_level(ink, size):
    """The paper under the (bright) ink: the minimum over each size x size window, then the
    maximum. Strokes narrower than the window vanish; paper, light falling off and the sharp
    edge of a shadow stay where they are (a blur would smear that edge into the ink)."""
    level = np.pad(ink, size, mode="reflect", reflect_type="odd")  # ramps go on past the border
    for reduce in (np.minimum, np.maximum):
        level = running_extreme(running_extreme(level, size, reduce).T, size, reduce).T
    return level[size:-size, size:-size]


def ink_only(ink):
    """Step 3: the ink, and nothing else. On even paper (the darkest quarter of the pixels all
    within a few percent of the contrast) the paper is one level; on uneven paper, its level at
    each pixel from paper_level with a window a sixth of the image. Subtract it, smooth away
    camera noise and keep the pixels clearly brighter than the noise, soft edges included."""
    size = max(ink.shape)
    darkest, quarter, top = np.percentile(ink, [1, 25, 99.9])
    even = quarter - darkest < 0.05 * (top - quarter)
    paper = quarter if even else paper_level(ink, int(size / 6) | 1)
    residual = blur(ink - paper, sigma=max(0.6, size / 400))
    low, paper_top = np.percentile(residual, [5, 25])  # at least a quarter of it is paper
    noise = paper_top - low  # about one standard deviation of Gaussian camera noise
    residual = np.clip(residual - paper_top, 0, None)
    peak = np.percentile(residual, 99.9)
    mask = residual > max(4 * noise, (0.1 if even else 0.25) * peak)
    mask &= blur(mask.astype(np.float32), sigma=1.0) > 0.3  # drop isolated specks
    if peak < 0.08 or peak < 6 * noise or not mask.any():
        raise ImageProblem("no ink found (the image looks blank or has too little contrast)")
    return np.where(mask, np.clip(residual / peak, 0, 1), 0.0)


# %%
def ink_span(profile, reach):
    """Start and end of the run of non-empty entries holding the most ink, joined with the
    runs at most `reach` away (a 7's bar drawn apart from its stem), not with specks far off."""
    edges = np.flatnonzero(np.diff(np.r_[0, (profile > 0).astype(int), 0]))
    runs = list(zip(edges[::2], edges[1::2]))
    start, end = max(runs, key=lambda run: profile[run[0]:run[1]].sum())
    for _ in runs:
        for run_start, run_end in runs:
            if max(run_start - end, start - run_end) <= reach:
                start, end = min(start, run_start), max(end, run_end)
    return start, end


def crop_to_ink(ink):
    """The digit's box: its ink, and ink up to half the digit's size away from it."""
    rows, cols = ink.sum(axis=1), ink.sum(axis=0)
    reach = 0.5 * max(end - start for start, end in (ink_span(rows, 0), ink_span(cols, 0)))
    (top, bottom), (left, right) = ink_span(rows, reach), ink_span(cols, reach)
    return ink[top:bottom, left:right]


def crop_and_thicken(ink):
    """Step 4: crop to the ink. A fine pen on a large digit gives strokes far thinner than
    MNIST's once scaled to 20 pixels: thicken them with a maximum filter first."""
    cropped = crop_to_ink(ink)
    factor = 20.0 / max(cropped.shape)
    missing = (MNIST_STROKE_WIDTH - stroke_width(cropped > 0.5) * factor) / factor
    if missing >= 2:
        size = min(2 * int(missing // 2) + 1, 31)  # odd: adds size - 1 pixels of width
        padded = Image.fromarray(np.pad(cropped, size).astype(np.float32), mode="F")
        cropped = crop_to_ink(np.asarray(padded.filter(ImageFilter.MaxFilter(size))))
    return cropped


# %%
def mnist_box_and_centre(cropped):
    """Steps 5 and 6 (MNIST's own): longer side to 20 pixels, averaging, then the centre of
    mass at MNIST's (14, 14) in a 28x28 image."""
    factor = 20.0 / max(cropped.shape)
    new_size = (max(1, round(cropped.shape[1] * factor)), max(1, round(cropped.shape[0] * factor)))
    small = np.clip(resize_array(cropped, new_size, Image.Resampling.BOX if factor < 1
                                 else Image.Resampling.BILINEAR), 0, None)
    rows, cols = np.indices(small.shape)
    top = int(round(MNIST_CENTRE_OF_MASS - (rows * small).sum() / small.sum()))
    left = int(round(MNIST_CENTRE_OF_MASS - (cols * small).sum() / small.sum()))
    top = int(np.clip(top, 0, 28 - small.shape[0]))
    left = int(np.clip(left, 0, 28 - small.shape[1]))
    digit = np.zeros((28, 28), dtype=np.float32)
    digit[top:top + small.shape[0], left:left + small.shape[1]] = small
    return digit / max(digit.max(), 1e-6)


def prepare_digit(image):
    """A photo or scan of one digit -> (28x28 MNIST-style image in [0, 1], the steps)."""
    steps = {"grey": to_grey(image)}
    steps["inverted"] = ink_up(steps["grey"])
    steps["ink"] = ink_only(steps["inverted"])
    steps["cropped"] = crop_and_thicken(steps["ink"])
    steps["mnist_style"] = mnist_box_and_centre(steps["cropped"])
    return steps["mnist_style"], steps


def prepare_digit_file(path):
    """prepare_digit for a file path; problems raise ImageProblem with a plain reason."""
    return prepare_digit(open_image(path))


# %%
def make_photo_like(digit, rng, canvas=(360, 480)):
    """Fake a phone photo of an MNIST digit: enlarged, dark ink on grey paper with the light
    falling off and a shadow across it, noisy, off-centre, in colour. An RGB uint8 array."""
    height, width = canvas
    scale = int(rng.integers(5, 9))
    big = resize_array(digit.astype(np.float32), (28 * scale, 28 * scale),
                       Image.Resampling.BICUBIC).clip(0, 1)
    rows, cols = np.mgrid[0:height, 0:width] / max(height, width)
    paper = 0.75 + 0.12 * rows - 0.08 * cols + rng.normal(0, 0.02)  # light falling off
    edge = cols - rng.uniform(-0.6, 0.6) * rows - rng.uniform(0.2, 0.8)  # a hand's shadow
    paper = paper * (1 - 0.4 / (1 + np.exp(-edge / 0.01)))
    top = int(rng.integers(0, height - big.shape[0]))
    left = int(rng.integers(0, width - big.shape[1]))
    ink = np.zeros((height, width), np.float32)
    ink[top:top + big.shape[0], left:left + big.shape[1]] = big
    grey = paper * (1 - 0.85 * ink) + rng.normal(0, 0.03, (height, width))
    tint = np.array([1.0, 0.97, 0.9])  # warm indoor light
    return (np.clip(grey[..., None] * tint, 0, 1) * 255).astype(np.uint8)


# %%
def plot_recipe(photos, all_steps, probabilities):
    titles = ["photo", "1. grey", "2. inverted", "3. ink only", "4. cropped", "5-6. 28x28"]
    figure, axes = plt.subplots(len(photos), 7, figsize=(14.7, 2.5 * len(photos)),
                                squeeze=False, gridspec_kw={"width_ratios": [1] * 6 + [1.6]},
                                layout="constrained")
    for row, (photo, steps, probs) in enumerate(zip(photos, all_steps, probabilities)):
        pictures = [photo] + [steps[name] for name in ("grey", "inverted", "ink", "cropped",
                                                       "mnist_style")]
        for axis, picture, title in zip(axes[row], pictures, titles):
            axis.imshow(picture, cmap="gray")
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(title if row == 0 else "", fontsize=9)
        show_probabilities(axes[row, -1], probs,
                           title=f"reads {int(probs.argmax())} ({probs.max():.0%})")
    figure.suptitle("A photo, step by step: our clean-up (grey, invert, ink only, crop), "
                    "then MNIST's recipe (20 px box, centre of mass)")
    return figure


demo_rng = np.random.default_rng(settings.seed)
demo_idx = [int(np.flatnonzero(y_test == digit)[0]) for digit in (2, 5, 7, 9)
            if (y_test == digit).any()]
photos = [make_photo_like(x_test[i, :, :, 0], demo_rng) for i in demo_idx]
try:
    prepared = [prepare_digit(Image.fromarray(photo)) for photo in photos]
    demo_probabilities = predict(cnn, np.stack([digit for digit, _ in prepared])[..., None])
    save_figure(plot_recipe(photos, [steps for _, steps in prepared], demo_probabilities),
                "15_your_digit_recipe.png", settings.output_dir)
    print("Photo-like test digits " + ", ".join(str(y_test[i]) for i in demo_idx) + " read as "
          + ", ".join(str(int(p.argmax())) for p in demo_probabilities))
except (ImageProblem, ValueError) as problem:  # e.g. test digits without ink in a bad file
    print(f"  (the photo demo could not run on these test digits: {problem})")
if IN_COLAB:
    from google.colab import files  # type: ignore  # Colab only: an upload button
    print("Upload photos of single handwritten digits (or press Cancel):")
    for name, content in files.upload().items():
        try:
            digit, _ = prepare_digit(open_image(io.BytesIO(content)))
        except ImageProblem as error:
            print(f"{name}: {error}")
            continue
        probabilities = predict(cnn, digit[np.newaxis, ..., np.newaxis])[0]
        print(f"{name}: {int(probabilities.argmax())} ({probabilities.max():.0%})")
else:
    print("Read your own digits: python cnn_mnist_classifier.py --predict my_digit.jpg "
          f"(or a folder) --model {model_path}")


# %% [markdown]
# ## 22. Draw a digit, and watch the network read it
#
# Draw with the mouse and the network reads the drawing as you go. The pad is turned into a
# 28x28 digit by the photo recipe of section 21, and beside it you see that digit, the ten
# probabilities (section 16) and the most active feature maps of each block (section 17),
# updated while you draw. The pad is 280x280 pixels, ten times MNIST's 28, and the brush
# draws round strokes 24 pixels wide: a digit drawn 200 pixels tall is scaled by 20/200 =
# 0.1, so its strokes become about 2.4 pixels wide, a little thinner than MNIST's 2.9. Step 4
# of the recipe makes up the difference on the pad. For strokes that measure the full 24
# pixels: (2.9 - 2.4) / 0.1 = 5 pixels, in whole pairs, so a 5x5 maximum filter widens each
# stroke by 4, to 28 pixels, 2.8 after scaling (short strokes measure thinner and get more).
#
# In a script run with a screen, the window opens at the end of the lesson, and
# `python cnn_mnist_classifier.py --draw` opens it again later without training. In Colab a
# drawing canvas appears below this cell instead; in Jupyter and VS Code the same canvas
# appears if the small `anywidget` package is installed. The canvas reads each stroke when it
# ends and shows the 28x28 digit and the bars (the feature maps are the window's).

# %%
print("\n## 22. Draw a digit, and watch the network read it")
import base64
from matplotlib.widgets import Button
from PIL import ImageDraw

PAD_SIZE = 280        # the drawing pad's pixels per side: 10 x MNIST's 28
BRUSH_WIDTH = 24      # pixels on the pad: 2.4 at 28x28 for a digit drawn 200 pixels tall
READS_PER_SECOND = 12  # at most this many readings a second while a stroke goes on
PAD_RECT = (0.02, 0.1, 0.4, 0.8)  # the pad's place in the window: left, bottom, width, height
MAPS_SHOWN = 4        # feature maps shown per block: the most active ones
FILE_ONLY_BACKENDS = ("agg", "cairo", "pdf", "pgf", "ps", "svg", "template")


def reading_model(model):
    """One call, every answer: each block's feature maps (if the model has our blocks) and
    the ten probabilities. Compiled here, so that the first stroke does not wait for it."""
    try:
        maps = [model.get_layer(name).output for name in block_outputs(model)]
    except (IndexError, ValueError):  # a model without conv1-conv3: the probabilities only
        maps = []
    probe = keras.Model(model.inputs[0], maps + [model.outputs[0]])
    probe.predict_on_batch(np.zeros((1, 28, 28, 1), "float32"))
    return probe


def read_drawing(probe, picture):
    """A drawing (a PIL image) read: (in words, 28x28 digit, probabilities, block maps). An
    empty pad, or one the recipe finds no digit on, gets words and blanks, not a prediction."""
    blanks = (np.zeros((28, 28), "float32"), np.zeros(10, "float32"), [])
    if not np.asarray(picture).any():
        return ("nothing drawn yet", *blanks)
    try:
        digit, _ = prepare_digit(picture)
    except ImageProblem as problem:
        return (f"read: nothing ({problem})", *blanks)
    # predict_on_batch: one compiled call, without predict()'s per-call set-up
    outputs = probe.predict_on_batch(digit[np.newaxis, :, :, np.newaxis])
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    *maps, probabilities = [np.asarray(output)[0] for output in outputs]  # probabilities last
    words = f"read: {int(probabilities.argmax())} ({probabilities.max():.0%})"
    return words, digit, probabilities.astype("float32"), maps


# %%
def drawing_window(map_sizes):
    """The window's parts: the pad, the 28x28 digit, the bars, and for each block a row of
    its most active feature maps (map_sizes: their sides, 13, 5 and 3 in ours)."""
    with plt.rc_context({"toolbar": "None"}):  # no zoom or pan tools on a drawing pad
        figure = plt.figure(figsize=(12, 6))
    figure.canvas.manager.set_window_title("Draw a digit")
    parts = {"figure": figure, "pad": figure.add_axes(PAD_RECT),
             "digit": figure.add_axes((0.47, 0.55, 0.14, 0.3)),
             "bars": figure.add_axes((0.46, 0.12, 0.16, 0.3)),
             "maps": [figure.add_axes((0.67, 0.62 - 0.26 * row, 0.31, 0.18))
                      for row in range(len(map_sizes))]}
    parts["pad_image"] = parts["pad"].imshow(np.zeros((PAD_SIZE, PAD_SIZE)), cmap="gray",
                                             vmin=0, vmax=255, interpolation="nearest")
    parts["digit_image"] = parts["digit"].imshow(np.zeros((28, 28)), cmap="gray", vmin=0, vmax=1)
    parts["digit"].set_title("the network sees", fontsize=10)
    parts["bar_list"] = parts["bars"].bar(range(10), np.zeros(10), color="lightgray")
    parts["bars"].set(ylim=(0, 1), xticks=range(10), title="probabilities")
    parts["map_images"] = [axis.imshow(strongest_maps(np.zeros((*size, 0))), vmin=0, vmax=1,
                                       interpolation="nearest")
                           for axis, size in zip(parts["maps"], map_sizes)]
    for row, axis in enumerate(parts["maps"]):
        axis.set_title(f"block {row + 1}: its most active feature maps", fontsize=9)
    for axis in [parts["pad"], parts["digit"], *parts["maps"]]:
        axis.set_axis_off()
    parts["changing"] = [parts["pad_image"], parts["pad"].title, parts["digit_image"],
                         *parts["bar_list"], *parts["map_images"]]
    for artist in parts["changing"]:
        artist.set_animated(True)  # drawn by refresh_window, not by a full redraw

    def remember_background(event):  # after each full redraw (a resize, say)
        parts["background"] = figure.canvas.copy_from_bbox(figure.bbox)
        for artist in parts["changing"]:
            figure.draw_artist(artist)
    figure.canvas.mpl_connect("draw_event", remember_background)
    return parts


def refresh_window(parts, artists=None):
    """Redraw only what changed (all that changes, or just `artists`) on the saved background:
    matplotlib's *blitting*. A full redraw of this window is too slow to follow the mouse."""
    canvas, figure = parts["figure"].canvas, parts["figure"]
    if parts.get("background") is None:  # not drawn yet
        canvas.draw_idle()
        return
    if artists is None:
        canvas.restore_region(parts["background"])
    for artist in artists or parts["changing"]:
        figure.draw_artist(artist)
    canvas.blit(artists[0].axes.bbox if artists else figure.bbox)


# %%
def strongest_maps(block_maps):
    """The most active maps of a block side by side, each scaled to 0-1, with gaps (NaN:
    drawn white). No maps (an empty pad): all gaps."""
    strongest = np.argsort(-block_maps.mean(axis=(0, 1)))[:MAPS_SHOWN]
    height, width = block_maps.shape[:2]
    row = np.full((height, MAPS_SHOWN * (width + 1) - 1), np.nan)
    for place, channel in enumerate(strongest):
        one_map = block_maps[:, :, channel]
        row[:, place * (width + 1):place * (width + 1) + width] = (
            (one_map - one_map.min()) / max(float(np.ptp(one_map)), 1e-6))
    return row


def show_in_window(parts, text, digit, probabilities, maps):
    """Put one reading into the window: the digit, the bars, each block's most active maps."""
    parts["digit_image"].set_data(digit)
    highest = probabilities.max()
    for bar, probability in zip(parts["bar_list"], probabilities):
        bar.set_height(probability)
        bar.set_color("tab:blue" if highest > 0 and probability == highest else "lightgray")
    for image, block_maps in zip(parts["map_images"], maps or [None] * len(parts["maps"])):
        blank = np.full(image.get_array().shape, np.nan)
        image.set_data(blank if block_maps is None else strongest_maps(block_maps))
    parts["pad"].set_title(f"{text}   (left button: draw, right button: clear)")
    refresh_window(parts)


# %%
class DrawingPad:
    """The window's behaviour: the left mouse button draws; the right button or Clear clears."""

    def __init__(self, model):
        self.probe = reading_model(model)
        self.parts = drawing_window([output.shape[1:3] for output in self.probe.outputs[:-1]])
        self.picture = Image.new("L", (PAD_SIZE, PAD_SIZE))  # black paper, white ink
        self.pen, self.last_point, self.last_read = ImageDraw.Draw(self.picture), None, 0.0
        figure = self.parts["figure"]
        self.clear_button = Button(figure.add_axes((0.02, 0.02, 0.1, 0.06)), "Clear")
        self.clear_button.on_clicked(lambda _: self.clear())
        for event, handler in (("button_press_event", self.press),
                               ("motion_notify_event", self.move),
                               ("button_release_event", self.release)):
            figure.canvas.mpl_connect(event, handler)
        self.clear()

    def press(self, event):
        if event.inaxes is self.parts["pad"] and event.button == 3:  # right button: clear
            self.clear()
        elif event.inaxes is self.parts["pad"] and event.button == 1:
            self.last_point = (event.xdata, event.ydata)
            self.draw_to(event.xdata, event.ydata)

    def move(self, event):
        if self.last_point is not None:  # off the pad too: Pillow draws only what is on it
            self.draw_to(*self.parts["pad"].transData.inverted().transform((event.x, event.y)))
            if time.perf_counter() - self.last_read >= 1 / READS_PER_SECOND:
                self.read()

    def release(self, event):
        if self.last_point is not None:
            self.last_point = None
            print(self.read(), flush=True)  # a stroke ended: say what the network reads

    def draw_to(self, x, y):
        """A round-ended stroke from the last point to (x, y), in pad pixels."""
        radius = BRUSH_WIDTH / 2
        self.pen.line([self.last_point, (x, y)], fill=255, width=BRUSH_WIDTH)
        self.pen.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
        self.last_point = (x, y)
        self.parts["pad_image"].set_data(np.asarray(self.picture))
        refresh_window(self.parts, [self.parts["pad_image"]])

    def clear(self):
        self.pen.rectangle((0, 0, PAD_SIZE, PAD_SIZE), fill=0)
        self.last_point = None
        self.parts["pad_image"].set_data(np.asarray(self.picture))
        self.read()

    def read(self):
        """The recipe and the network on the pad, shown in the window; the reading in words."""
        self.last_read = time.perf_counter()
        text, digit, probabilities, maps = read_drawing(self.probe, self.picture)
        show_in_window(self.parts, text, digit, probabilities, maps)
        return text


# %% [markdown]
# In a notebook the window cannot open, so the same pad is a small web page in the cell's
# output: an HTML canvas and a few lines of JavaScript that send the drawing (as a PNG) to
# Python after every stroke and draw the answer as bars.

# %%
READING_JS = """
function showReading(root, reading) {  // the words, the 28x28 digit and the ten bars
  root.querySelector(".text").textContent = reading.text;
  const digit = root.querySelector(".digit");
  if (reading.digit) digit.src = reading.digit;
  else digit.removeAttribute("src");  // no digit: an empty box, not a broken-image icon
  const probabilities = reading.probabilities || [], highest = Math.max(...probabilities);
  root.querySelector(".bars").innerHTML = probabilities.map((p, d) => `<div style="text-align:
    center;font:11px sans-serif"><div style="width:16px;height:${Math.round(100 * p)}px;
    background:${p === highest ? "#1f77b4" : "#ccc"}"></div>${d}</div>`).join("");
}
const PAD_HTML = `<div data-jp-suppress-context-menu
  style="display:flex;gap:16px;align-items:flex-start">
  <div><canvas width="%(size)d" height="%(size)d" style="background:#000;touch-action:none;
    cursor:crosshair"></canvas><br><button>Clear</button> <span class="text"></span></div>
  <div><img class="digit" width="112" height="112"
    style="image-rendering:pixelated;background:#000"><div class="bars" style="display:flex;
    gap:3px;align-items:flex-end;height:120px"></div></div></div>`;
""" % {"size": PAD_SIZE}  # a %-format string: a literal % is %%


# %%
CANVAS_JS = READING_JS + """
function drawingPad(root, send) {  // send(png data URL) may return a Promise of a reading
  root.innerHTML = PAD_HTML;
  const canvas = root.querySelector("canvas"), pen = canvas.getContext("2d");
  const show = reading => showReading(root, reading);
  let last = null, strokes = 0;  // strokes: a late answer to an older stroke is dropped
  function clear() {
    strokes += 1;
    pen.fillStyle = "#000";
    pen.fillRect(0, 0, canvas.width, canvas.height);
    show({text: "nothing drawn yet"});
  }
  function point(event) {
    const box = canvas.getBoundingClientRect();
    return [event.clientX - box.left, event.clientY - box.top];
  }
  canvas.addEventListener("pointerdown", event => {
    if (event.button === 2) return clear();
    if (event.button !== 0) return;  // the left button (or a finger) draws
    last = point(event);
    canvas.setPointerCapture(event.pointerId);
    pen.fillStyle = "#fff";  // a dot, in case the pointer does not move
    pen.beginPath();
    pen.arc(...last, %(brush)d / 2, 0, 2 * Math.PI);
    pen.fill();
  });
  canvas.addEventListener("pointermove", event => {
    if (!last) return;
    const next = point(event);
    Object.assign(pen, {strokeStyle: "#fff", lineWidth: %(brush)d, lineCap: "round"});
    pen.beginPath();
    pen.moveTo(...last);
    pen.lineTo(...next);
    pen.stroke();
    last = next;
  });
  function strokeEnded() {
    if (!last) return;
    last = null;
    const stroke = ++strokes;
    Promise.resolve(send(canvas.toDataURL("image/png")))
      .then(reading => reading && stroke === strokes && show(reading))
      .catch(error => show({text: "could not read the drawing: " + error}));
  }
  for (const name of ["pointerup", "pointercancel", "lostpointercapture"]) {
    canvas.addEventListener(name, strokeEnded);
  }
  canvas.addEventListener("contextmenu", event => event.preventDefault());
  root.querySelector("button").addEventListener("click", clear);
  clear();
  return show;
}
""" % {"brush": BRUSH_WIDTH}


# %%
def read_png_drawing(probe, data_url):
    """What the canvas sends (a PNG as a data URL) -> a reading for the page, as a dict."""
    picture = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("L")
    text, digit, probabilities, _ = read_drawing(probe, picture)
    if not probabilities.any():  # nothing drawn, or no digit found: the words only
        return {"text": text}
    png = io.BytesIO()
    Image.fromarray((digit * 255).astype(np.uint8)).save(png, format="PNG")
    return {"text": text, "probabilities": probabilities.tolist(),
            "digit": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}


# %%
def show_canvas_in_colab(model):
    """Colab: the page calls Python through google.colab's kernel bridge."""
    from google.colab import output  # type: ignore
    from IPython.display import HTML, JSON, display
    probe = reading_model(model)
    output.register_callback("mnist.read", lambda url: JSON(read_png_drawing(probe, url)))
    display(HTML(colab_canvas_html()))


def colab_canvas_html():
    """The canvas, calling the Python function registered as "mnist.read" after each stroke."""
    return ("<div id='mnist-pad'></div><script>" + CANVAS_JS + "drawingPad(document."
            "getElementById('mnist-pad'), url => google.colab.kernel.invokeFunction("
            "'mnist.read', [url], {}).then(r => r.data['application/json']));</script>")


WIDGET_JS = CANVAS_JS + """export default { render({ model, el }) {  // anywidget's module
  const show = drawingPad(el, url => { model.set("png", url); model.save_changes(); });
  model.on("change:reading", () => show(model.get("reading"))); } };"""


def show_canvas_widget(model):
    """Jupyter and VS Code: the same page as an anywidget, which syncs two values."""
    import anywidget
    import traitlets
    from IPython.display import display

    class DrawingCanvas(anywidget.AnyWidget):
        _esm = WIDGET_JS
        png = traitlets.Unicode("").tag(sync=True)
        reading = traitlets.Dict().tag(sync=True)

    probe, widget = reading_model(model), DrawingCanvas()
    widget.observe(lambda change: setattr(widget, "reading", read_png_drawing(
        probe, change["new"])), names="png")
    display(widget)
    return widget


# %%
def draw_window(model_path):
    """--draw: the saved model reads what you draw, until the window is closed."""
    if matplotlib.get_backend().lower() in FILE_ONLY_BACKENDS:
        fail("--draw needs a screen to open a window on, and there is none here (no display, "
             "or MPLBACKEND or --no-show chose files only). To read digits from image files "
             "instead: python cnn_mnist_classifier.py --predict my_digit.jpg")
    pad = DrawingPad(load_trained_model(model_path))  # kept alive: its button needs it
    print("Draw a digit with the left mouse button (right button or Clear: clear); close "
          "the window to finish.", flush=True)
    plt.show()
    return 0


if IN_COLAB:
    show_canvas_in_colab(cnn)
elif IN_NOTEBOOK:
    try:
        show_canvas_widget(cnn)
    except ImportError:
        print("To draw a digit here: pip install \"anywidget>=0.9\", reload the page and run "
              "this cell again; or, from a terminal: python cnn_mnist_classifier.py --draw "
              f"--model {model_path}")
elif matplotlib.get_backend().lower() not in FILE_ONLY_BACKENDS:
    drawing_pad = DrawingPad(cnn)
    print("Draw your own digit in the window \"Draw a digit\": close the windows to finish.")
    plt.show()  # a script with a screen: every figure opens at the end
else:
    print("With a screen, draw your own digits and watch them read: python "
          f"cnn_mnist_classifier.py --draw --model {model_path}")


# %% [markdown]
# ## 23. `--predict`: read digits from image files and folders
#
# A tool, not part of the lesson: the setup cell calls `predict_files` and skips everything
# else. It loads the saved model and reads each image with the recipe above, in batches, so a
# folder of hundreds of photos takes seconds and little memory. It prints the top three
# guesses per image, writes every one to `predictions.csv`, and draws the least confident
# ones (at most `PREDICT_FIGURE_IMAGES`) to `predictions.png`, the ones most worth a look.

# %%
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
PREDICT_BATCH = 64           # images prepared and predicted together
PREDICT_FIGURE_IMAGES = 24   # at most this many images are drawn in predictions.png


def load_trained_model(path):
    """A model file the user names: only with a Keras that loads model files safely."""
    keras_problem = keras_too_old()
    if keras_problem:
        fail(f"{keras_problem} (then run --predict again).")
    if not os.path.isfile(path):
        fail(f"no trained model at {path}. Train one first: python cnn_mnist_classifier.py "
             "(or add --quick for a short tour), then run --predict again "
             "(use --model PATH for a model saved elsewhere).")
    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # not a zip, not a Keras model, or unsafe content
        reason = (str(error).strip() or type(error).__name__).splitlines()[0][:200]
        fail(f"{path} is not a Keras model this script can load ({reason}). Pass --model with "
             "a .keras file saved by this script, or train again.")
    if tuple(model.input_shape[1:]) != (28, 28, 1) or tuple(model.output_shape[1:]) != (10,):
        fail(f"{path} is a Keras model, but not one for 28x28 digits with 10 classes (input "
             f"{model.input_shape}, output {model.output_shape}). Pass a model saved by this "
             "script.")
    return model


def expand_image_paths(paths):
    """Files as given; a folder stands for its image files, in sorted order."""
    expanded = []
    for path in paths:
        if not os.path.isdir(path):
            expanded.append(path)
            continue
        names = sorted(name for name in os.listdir(path) if not name.startswith(".")  # hidden
                       and name.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            print(f"error: {path}: folder has no image files ({', '.join(IMAGE_EXTENSIONS)})",
                  file=sys.stderr)
        expanded += [os.path.join(path, name) for name in names]
    return expanded


# %%
def plot_predictions(rows):
    """rows: (path, digit, probabilities); photos are reopened as small copies."""
    columns, lines = 4, math.ceil(len(rows) / 4)
    figure, axes = plt.subplots(lines, 2 * columns, squeeze=False,
                                figsize=(2 * columns * 1.3, lines * 1.75))
    for axis in axes.flat:
        axis.axis("off")
    for number, (path, digit, probs) in enumerate(rows):
        photo_axis, digit_axis = axes[number // columns, 2 * (number % columns):][:2]
        with contextlib.suppress(ImageProblem):
            photo = open_image(path)
            photo.thumbnail((160, 160))
            photo_axis.imshow(np.asarray(photo.convert("RGB")))
        photo_axis.set_title(os.path.basename(path)[:18], fontsize=7)
        show_digit(digit_axis, digit, f"reads {int(probs.argmax())} ({probs.max():.0%})")
        digit_axis.axis("on")
        digit_axis.set_xticks([])
        digit_axis.set_yticks([])
    return figure


# %%
def predict_files(paths, model_path, output_dir):
    """Read each image; print and save the guesses. Returns the exit code (1 if any failed)."""
    model = load_trained_model(model_path)
    paths = expand_image_paths(paths)
    results, failures, started = [], 0, time.perf_counter()
    for first in range(0, len(paths), PREDICT_BATCH):
        names, digits = [], []
        for path in paths[first:first + PREDICT_BATCH]:
            try:
                digits.append(prepare_digit_file(path)[0])
                names.append(path)
            except ImageProblem as problem:
                print(f"error: {path}: {problem}", file=sys.stderr)
                failures += 1
        if digits:
            probabilities = predict(model, np.stack(digits)[..., np.newaxis], PREDICT_BATCH)
            results += list(zip(names, digits, probabilities))
        if len(paths) > PREDICT_BATCH:
            print(f"  read {min(first + PREDICT_BATCH, len(paths))} of {len(paths)} images "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    for path, _, probs in results:
        ranked = np.argsort(-probs)
        print(f"{path}: {ranked[0]} ({probs[ranked[0]]:.1%}); next {ranked[1]} "
              f"({probs[ranked[1]]:.1%}), {ranked[2]} ({probs[ranked[2]]:.1%})")
    if results:
        write_csv(os.path.join(output_dir, "predictions.csv"),
                  ["path", "prediction", "confidence"] + [f"p{d}" for d in range(10)],
                  [[path, int(probs.argmax()), f"{probs.max():.6f}",
                    *(f"{p:.6f}" for p in probs)] for path, _, probs in results])
        shown = sorted(results, key=lambda row: row[2].max())[:PREDICT_FIGURE_IMAGES]
        figure = plot_predictions(shown)
        figure.suptitle(f"{len(shown)} of {len(results)} images" +
                        (" (the least confident)" if len(shown) < len(results) else "") +
                        "; every image is in predictions.csv")
        save_figure(figure, "predictions.png", output_dir)
        print(f"Wrote {os.path.join(output_dir, 'predictions.csv')} ({len(results)} images)")
    if not paths:
        print("error: no images to read", file=sys.stderr)
    elif failures:
        print(f"{failures} of {len(paths)} image(s) could not be read", file=sys.stderr)
    return 1 if failures or not results else 0
