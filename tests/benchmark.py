"""Benchmark: the tutorial's recipe, one ingredient at a time, against a plain `model.fit`.

Not collected by pytest (the name does not start with test_). Run by hand from the project root,
with MNIST_DATA_DIR set (e.g. MNIST_DATA_DIR=../shared/mnist):

    python tests/benchmark.py --progression   # plain -> +schedule -> +augmentation -> ours
    python tests/benchmark.py --sweep         # label smoothing and zoom, alone and together
    python tests/benchmark.py --augmentation  # plain vs ours (augmentation layer), side by side
    python tests/benchmark.py --threshold     # 5 epochs with and without augmentation
    python tests/benchmark.py --exercises     # the "Try this" variants, 1 epoch, seed 1
    python tests/benchmark.py --backends tensorflow jax torch   # the tutorial itself per backend
                                  # (BENCHMARK_KEEP_OUTPUTS=DIR keeps each run's outputs)
    python tests/benchmark.py --jit           # compiled (XLA) or not, per backend, on this CPU
    python tests/benchmark.py --short         # a 2-minute check
    python tests/benchmark.py --photos outputs/mnist_cnn.keras   # the photo recipe, per kind
    python tests/benchmark.py --layer-speed ours   # 100 steps: none, ours or keras augmentation
    python tests/benchmark.py --draw-speed outputs/mnist_cnn.keras   # the drawing window's
                                  # readings per second while a stroke goes on (needs a screen)

Every configuration trains in its own fresh Python process, one after the other, on the same
data split, and reports wall-clock and CPU seconds (CPU time is steadier on a shared machine),
validation and test accuracy at the last epoch and at the best validation epoch. Choices in the
tutorial are made on validation accuracy only; test accuracy is reported, never used to choose.

* "plain": the tutorial's architecture trained the plain way: Adam at a constant 1e-3, batch
  128, BatchNorm's default momentum 0.99, no augmentation, `model.fit` on the arrays.
* "recipe": the tutorial's own helpers (its augmentation layer, schedule, BatchNorm rule and
  train()), with the ingredients switched on or off by the configuration.
* "tutorial": `cnn_mnist_classifier.py` itself, run as a user runs it.
Results are printed and written as JSON (default benchmark.json).
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "cnn_mnist_classifier.py")


def load_tutorial():
    """The tutorial's definitions, without running its lesson (its own load_definitions)."""
    import ast
    with open(SCRIPT, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    loader = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)) or
              getattr(node, "name", "") == "load_definitions"]
    namespace = {}
    exec(compile(ast.Module(loader, type_ignores=[]), SCRIPT, "exec"), namespace)
    return namespace["load_definitions"](SCRIPT)


def last_epoch_weights_callback():
    import keras

    class LastEpochWeights(keras.callbacks.Callback):
        """The weights at the end of each epoch (the last one's stay), before train() puts
        the best epoch's back."""
        def on_epoch_end(self, epoch, logs=None):
            self.weights = self.model.get_weights()
    return LastEpochWeights()


def worker(config):
    """Train one configuration in this process and print one JSON line with the results."""
    tutorial = load_tutorial()
    import keras
    import numpy as np
    seed, epochs = config["seed"], config["epochs"]
    setting = {name: value[0] for name, value in tutorial.SETTINGS.items()}
    batch_size = setting["batch_size"]
    keras.utils.set_random_seed(seed)
    if tutorial.BACKEND == "tensorflow" and config.get("jit") != "on":
        import tensorflow as tf
        # As the tutorial does on a CPU; not with --jit on, since Keras turns XLA off under it.
        tf.config.experimental.enable_op_determinism()
    (x_all, y_all, x_test_raw, y_test), _ = tutorial.load_mnist(os.environ.get("MNIST_DATA_DIR"))
    (train_images, train_labels), (val_images, val_labels) = tutorial.split_train_validation(
        x_all, y_all, setting["validation_split"], config.get("subset"), seed)
    x_train, x_val, x_test = (tutorial.preprocess_images(a)
                              for a in (train_images, val_images, x_test_raw))
    y_train, y_val, y_test_onehot = (keras.utils.to_categorical(a, 10)
                                     for a in (train_labels, val_labels, y_test))
    steps_per_epoch = -(-len(x_train) // batch_size)
    total_steps = steps_per_epoch * epochs
    variant = config.get("variant", "")
    momentum = 0.99 if config.get("bn") == "default" else tutorial.batchnorm_momentum_for(total_steps)
    if variant == "dense":
        cnn = tutorial.build_dense_model()
    else:
        cnn = tutorial.build_model(momentum, padding="same" if variant == "same" else "valid",
                                   batchnorm=variant != "no_bn", pooling=variant != "no_pool")
    jit = {"on": True, "off": False}.get(config.get("jit"), tutorial.BACKEND == "jax")
    started, cpu_started = time.perf_counter(), time.process_time()
    if config["kind"] == "plain":
        model = cnn
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                      metrics=["accuracy"], jit_compile=jit)
        history = model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs,
                            validation_data=(x_val, y_val), verbose=0).history
        best_weights = None
    else:
        peak = setting["peak_learning_rate"] * config.get("lr_factor", 1)
        if config.get("schedule", "warmup_cosine") == "warmup_cosine":
            schedule = tutorial.make_learning_rate_schedule(total_steps, peak,
                                                            setting["warmup_fraction"])
        else:
            schedule = 1e-3
        model = cnn
        if config.get("augment"):
            augmentation = tutorial.RandomShiftRotateZoom(
                config.get("rotation", setting["max_rotation"]),
                config.get("shift", setting["max_shift"]),
                config.get("zoom", setting["max_zoom"]), seed=seed)
            model = keras.Sequential([keras.Input(shape=(28, 28, 1)), augmentation, cnn])
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=schedule),
                      loss=keras.losses.CategoricalCrossentropy(
                          label_smoothing=config.get("label_smoothing",
                                                     setting["label_smoothing"])),
                      metrics=["accuracy"], jit_compile=jit)
        last = last_epoch_weights_callback()
        history, _, _, _ = tutorial.train(model, x_train, y_train, (x_val, y_val), epochs,
                                          batch_size, [last])
        best_weights = model.get_weights()  # train() has put the best epoch's weights back
        model.set_weights(last.weights)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    _, last_test = model.evaluate(x_test, y_test_onehot, batch_size=500, verbose=0)
    best_epoch = int(np.argmax(history["val_accuracy"])) + 1
    best_test = last_test
    if best_weights is not None:
        model.set_weights(best_weights)
        _, best_test = model.evaluate(x_test, y_test_onehot, batch_size=500, verbose=0)
    print("RESULT " + json.dumps({
        **config, "backend": tutorial.BACKEND, "train_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1), "seconds_per_epoch": round(seconds / epochs, 2),
        "val_accuracy": [round(v, 5) for v in history["val_accuracy"]],
        "last_val_accuracy": round(history["val_accuracy"][-1], 5),
        "best_val_accuracy": round(max(history["val_accuracy"]), 5), "best_epoch": best_epoch,
        "last_test_accuracy": round(float(last_test), 5),
        "best_test_accuracy": round(float(best_test), 5),
        "parameters": int(cnn.count_params()), "peak_memory_mb": tutorial.peak_memory_mb(),
    }), flush=True)


def run_tutorial(config):
    """Run cnn_mnist_classifier.py itself, exactly as a user would, and read what it wrote."""
    keep = os.environ.get("BENCHMARK_KEEP_OUTPUTS")  # a folder: keep each run's outputs there
    with tempfile.TemporaryDirectory() as temporary:
        output_dir = os.path.join(keep, config["name"].replace(" ", "_")) if keep else temporary
        command = [sys.executable, SCRIPT, "--seed", str(config["seed"]), "--epochs",
                   str(config["epochs"]), "--output-dir", output_dir, "--no-show"]
        if os.environ.get("MNIST_DATA_DIR"):
            command += ["--data-dir", os.environ["MNIST_DATA_DIR"]]
        env = dict(os.environ, KERAS_BACKEND=config.get("backend", "tensorflow"))
        started = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        whole_run = time.perf_counter() - started
        if completed.returncode != 0:
            sys.stderr.write(completed.stderr[-3000:])
            raise SystemExit(f"the tutorial failed for {config} (exit {completed.returncode})")
        with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as handle:
            metrics = json.load(handle)
    return {**config, "whole_run_seconds": round(whole_run, 1),
            "train_seconds": metrics["training_seconds"],
            "seconds_per_epoch": metrics["seconds_per_epoch"],
            "best_val_accuracy": metrics["best_val_accuracy"], "best_epoch": metrics["best_epoch"],
            "best_test_accuracy": metrics["test_accuracy"],
            "overfit": [metrics["overfit_final_train_accuracy"],
                        metrics["overfit_final_val_accuracy"]],
            "peak_memory_mb": metrics["peak_memory_mb"], "device": metrics["device"]}


def run_config(config):
    """Run one configuration in a fresh process; return its result dictionary."""
    if config["kind"] == "tutorial":
        return run_tutorial(config)
    env = dict(os.environ, KERAS_BACKEND=config.get("backend", "tensorflow"))
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(config)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(completed.stderr[-3000:])
    print(f"configuration {config} failed (exit {completed.returncode})", flush=True)
    return {**config, "error": completed.stderr.strip().splitlines()[-1:] or ["failed"]}


def plain_recipe(image):
    """MNIST's own recipe and nothing more, for comparison: grey, ink up, paper to 0, crop to
    the ink, longer side to 20 pixels, centre of mass in the middle of 28x28."""
    import numpy as np
    from PIL import Image
    grey = np.asarray(image.convert("L"), np.float32) / 255
    ink = 1 - grey if np.median(grey) > 0.5 else grey
    ink = np.clip(ink - np.median(ink), 0, None)
    ink /= max(ink.max(), 1e-6)
    rows, cols = np.nonzero(ink > 0.3)
    if not len(rows):
        return np.zeros((28, 28), np.float32)
    crop = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = 20 / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    small = np.asarray(Image.fromarray(crop, "F").resize(size, Image.Resampling.BOX))
    ys, xs = np.indices(small.shape)
    top = int(np.clip(round(14 - (ys * small).sum() / small.sum()), 0, 28 - small.shape[0]))
    left = int(np.clip(round(14 - (xs * small).sum() / small.sum()), 0, 28 - small.shape[1]))
    digit = np.zeros((28, 28), np.float32)
    digit[top:top + small.shape[0], left:left + small.shape[1]] = small
    return digit / max(digit.max(), 1e-6)


def photo_scores(model_path, per_digit, seed=0):
    """Each kind of picture (tests/make_user_photos.py): how many the tutorial's recipe and
    the plain recipe read right with the model at model_path."""
    tutorial = load_tutorial()
    import keras
    import numpy as np
    from make_user_photos import KINDS, make_set
    model = keras.saving.load_model(model_path)
    rows = []
    for number, kind in enumerate(KINDS):
        pictures = make_set(kind, per_digit, seed + number, os.environ.get("MNIST_DATA_DIR"))
        truth = np.array([digit for digit, _ in pictures])
        scores = {"kind": kind, "pictures": len(pictures)}
        for name, recipe in (("tutorial", lambda p: tutorial.prepare_digit(p)[0]),
                             ("plain", plain_recipe)):
            digits, failed = [], 0
            for _, picture in pictures:
                try:
                    digits.append(recipe(picture))
                except tutorial.ImageProblem:
                    digits.append(np.zeros((28, 28), np.float32))
                    failed += 1
            predicted = model.predict(np.stack(digits)[..., None], verbose=0).argmax(1)
            scores[name] = round(float((predicted == truth).mean()), 4)
            scores[f"{name}_failed"] = failed
        print(scores, flush=True)
        rows.append(scores)
    return rows


def layer_speed(variant):
    """CPU and wall seconds of 100 training steps (128 images each, after a warm-up step) of
    the tutorial's network with no augmentation ("none"), its augmentation layer ("ours") or
    Keras' three augmentation layers ("keras"), compiled as the tutorial compiles it."""
    tutorial = load_tutorial()
    import keras
    if tutorial.BACKEND == "tensorflow":
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()  # as the tutorial does on a CPU
    keras.utils.set_random_seed(1)
    (x, y, _, _), _ = tutorial.load_mnist(os.environ.get("MNIST_DATA_DIR"))
    x, y = tutorial.preprocess_images(x[:12800]), keras.utils.to_categorical(y[:12800], 10)
    layers = {"none": [], "ours": [tutorial.RandomShiftRotateZoom(8, 2, 0.1, seed=1)],
              "keras": [keras.layers.RandomTranslation(2 / 28, 2 / 28, fill_mode="constant"),
                        keras.layers.RandomRotation(8 / 360, fill_mode="constant"),
                        keras.layers.RandomZoom(0.1, fill_mode="constant")]}[variant]
    model = keras.Sequential([keras.Input((28, 28, 1)), *layers, tutorial.build_model()])
    model.compile(optimizer="adam", loss="categorical_crossentropy",
                  jit_compile=tutorial.BACKEND == "jax")
    model.fit(x[:128], y[:128], batch_size=128, epochs=1, verbose=0)
    started, cpu_started = time.perf_counter(), time.process_time()
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    print(f"{tutorial.BACKEND} {variant}: 100 steps in {time.perf_counter() - started:.1f} s "
          f"wall, {time.process_time() - cpu_started:.1f} s CPU", flush=True)


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def progression_configs(seeds):
    configs = []
    for seed in seeds:
        configs += [
            {"kind": "plain", "name": "plain", "seed": seed, "epochs": 10},
            {"kind": "recipe", "name": "+ warm-up/cosine", "seed": seed, "epochs": 10,
             "label_smoothing": 0},
            {"kind": "recipe", "name": "+ augmentation", "seed": seed, "epochs": 10,
             "augment": True, "zoom": 0, "label_smoothing": 0},
            {"kind": "recipe", "name": "+ zoom, label smoothing (ours)", "seed": seed,
             "epochs": 10, "augment": True},
            {"kind": "recipe", "name": "1 epoch, BN momentum 0.99", "seed": seed, "epochs": 1,
             "bn": "default"},
            {"kind": "recipe", "name": "1 epoch, BN momentum rule", "seed": seed, "epochs": 1},
        ]
    return configs


def augmentation_configs(seeds):
    """Augmentation as a Keras layer: plain and ours alternate, 10 epochs (accuracy, and CPU
    time side by side)."""
    configs = []
    for seed in seeds:
        configs += [
            {"kind": "plain", "name": "plain", "seed": seed, "epochs": 10},
            {"kind": "recipe", "name": "ours (augmentation layer)", "seed": seed, "epochs": 10,
             "augment": True},
        ]
    return configs


def threshold_configs(seeds):
    """augment_min_epochs: 5 epochs with and without augmentation."""
    configs = []
    for seed in seeds:
        configs += [
            {"kind": "recipe", "name": "5 epochs, no augmentation", "seed": seed, "epochs": 5},
            {"kind": "recipe", "name": "5 epochs, augmented", "seed": seed, "epochs": 5,
             "augment": True},
        ]
    return configs


def sweep_configs(seeds):
    """The variants tried before the zoom and label smoothing were chosen (on validation)."""
    configs = []
    for seed in seeds:
        configs += [
            {"kind": "recipe", "name": "shift, rotate + label smoothing", "seed": seed,
             "epochs": 10, "augment": True, "zoom": 0},
            {"kind": "recipe", "name": "shift, rotate + zoom", "seed": seed, "epochs": 10,
             "augment": True, "label_smoothing": 0},
            {"kind": "recipe", "name": "shift, rotate + zoom + label smoothing (ours)",
             "seed": seed, "epochs": 10, "augment": True},
        ]
    return configs


def draw_speed(model_path, seconds=3.0, mouse_hz=100):
    """The --draw window, in this process, with the screen's own backend: a mouse drawing a
    circle sends its position mouse_hz times a second; while the window is busy, positions
    queue up and only the latest is handled (as Tk and Qt compress motion events). Counts
    the readings (recipe, network, window update) and pad updates per second."""
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import MouseEvent
    tutorial = load_tutorial()
    pad = tutorial.DrawingPad(tutorial.load_trained_model(model_path))
    figure, axis = pad.parts["figure"], pad.parts["pad"]
    plt.show(block=False)
    figure.canvas.draw()
    figure.canvas.flush_events()
    reads, handled = [], 0
    read = pad.read
    pad.read = lambda: (reads.append(time.perf_counter()), read())[1]

    def send(name, t):
        angle = 2 * math.pi * t / seconds
        x, y = 140 + 70 * math.sin(angle), 140 - 100 * math.cos(angle)
        px, py = axis.transData.transform((x, y))
        figure.canvas.callbacks.process(name, MouseEvent(name, figure.canvas, px, py, button=1))

    send("button_press_event", 0.0)
    started = time.perf_counter()
    while (now := time.perf_counter() - started) < seconds:
        send("motion_notify_event", now)  # the latest position; the ones missed are dropped
        handled += 1
        figure.canvas.flush_events()
        time.sleep(max(0.0, 1 / mouse_hz - (time.perf_counter() - started - now)))
    during = [r for r in reads if r >= started]
    send("button_release_event", seconds)
    result = {"backend": matplotlib.get_backend(), "seconds": seconds,
              "readings_per_second": round(len(during) / seconds, 1),
              "pad_updates_per_second": round(handled / seconds, 1), "machine": cpu_name()}
    print(json.dumps(result))
    return result


def summarise(results):
    """Mean and range over seeds, per configuration name."""
    by_name = {}
    for result in (r for r in results if "error" not in r):
        by_name.setdefault(result["name"], []).append(result)
    rows = []
    for name, group in by_name.items():
        row = {"name": name, "runs": len(group)}
        for key in ("last_val_accuracy", "last_test_accuracy", "best_val_accuracy",
                    "best_test_accuracy", "train_seconds", "cpu_seconds"):
            values = [r[key] for r in group if key in r]
            if values:
                row[key] = {"mean": round(statistics.mean(values), 5),
                            "min": min(values), "max": max(values)}
        rows.append(row)
        print(f"{name:<28} runs {len(group)}  " + "  ".join(
            f"{key} {value['mean']:.4f} [{value['min']:.4f}, {value['max']:.4f}]"
            for key, value in row.items() if isinstance(value, dict)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--progression", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--augmentation", action="store_true")
    parser.add_argument("--threshold", action="store_true")
    parser.add_argument("--exercises", action="store_true")
    parser.add_argument("--backends", nargs="+", metavar="BACKEND")
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--short", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=10, help="for --backends")
    parser.add_argument("--output", default="benchmark.json", help="where to write the JSON")
    parser.add_argument("--photos", metavar="MODEL", help="score the photo recipe and a plain "
                        "one on every kind of picture in tests/make_user_photos.py")
    parser.add_argument("--per-digit", type=int, default=10, help="for --photos")
    parser.add_argument("--layer-speed", choices=("none", "ours", "keras"),
                        help="time 100 training steps with that augmentation (set "
                        "KERAS_BACKEND for the backend)")
    parser.add_argument("--draw-speed", metavar="MODEL", help="readings per second in the "
                        "drawing window while a stroke goes on (needs a screen)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.draw_speed:
        draw_speed(args.draw_speed)
        return
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.layer_speed:
        layer_speed(args.layer_speed)
        return
    if args.photos:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        rows = photo_scores(args.photos, args.per_digit)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"machine": cpu_name(), "photos": rows}, handle, indent=2)
        return
    if not os.environ.get("MNIST_DATA_DIR"):
        print("note: MNIST_DATA_DIR is not set; the workers will download MNIST with Keras")
    configs = []
    if args.progression:
        configs += progression_configs(args.seeds)
    if args.sweep:
        configs += sweep_configs(args.seeds)
    if args.augmentation:
        configs += augmentation_configs(args.seeds)
    if args.threshold:
        configs += threshold_configs(args.seeds)
    if args.exercises:
        configs += [{"kind": "recipe", "name": f"exercise {variant or 'base'}", "seed": 1,
                     "epochs": 1, "variant": variant}
                    for variant in ("", "no_bn", "no_pool", "same", "dense")]
        configs.append({"kind": "recipe", "name": "exercise lr x10", "seed": 1, "epochs": 1,
                        "lr_factor": 10})
        configs.append({"kind": "recipe", "name": "exercise lr x10, no label smoothing",
                        "seed": 1, "epochs": 1, "lr_factor": 10, "label_smoothing": 0})
    if args.jit:
        for backend in ("tensorflow", "jax", "torch"):
            configs += [{"kind": "recipe", "name": f"jit {jit} {backend}", "seed": 1,
                         "epochs": 1, "subset": 10000, "jit": jit, "backend": backend}
                        for jit in ("off", "on")]
    for backend in args.backends or []:
        configs.append({"kind": "tutorial", "name": f"tutorial {backend}", "seed": 1,
                        "epochs": args.epochs, "backend": backend})
    if args.short:
        configs += [{"kind": "plain", "name": "plain", "seed": 1, "epochs": 1},
                    {"kind": "recipe", "name": "recipe", "seed": 1, "epochs": 1}]
    results = []
    for config in configs:
        print(f"running {config} ...", flush=True)
        results.append(run_config(config))
        print(f"  -> {json.dumps(results[-1])}", flush=True)
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} CPU cores, "
          f"Python {platform.python_version()}")
    summary = summarise(results)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump({"machine": {"processor": cpu_name(), "cores": os.cpu_count(),
                               "python": platform.python_version()},
                   "results": results, "summary": summary}, handle, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
