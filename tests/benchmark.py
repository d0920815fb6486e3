"""Benchmark: the tutorial's training recipe against a plain `model.fit`, side by side.

Not collected by pytest (the name does not start with test_). Run by hand from the project root:

    MNIST_DATA_DIR=../shared/mnist python tests/benchmark.py          # full: ~30 min, 2 CPU cores
    MNIST_DATA_DIR=../shared/mnist python tests/benchmark.py --short  # quick check: ~2 min

Each configuration trains in its own fresh Python process (so peak memory and timings do not
leak between runs) on the same data split.

* "reference": the tutorial's architecture trained the plain way: Adam at a constant 1e-3,
  batch 128, BatchNorm's default momentum, no augmentation, the final epoch's weights.
* "tutorial": `cnn_mnist_classifier.py` itself, run as a user runs it (`--seed N --epochs E`),
  its numbers read from the metrics.json and history.csv it writes. Its recipe: warm-up + cosine
  learning rate, BatchNorm momentum set from the run length, shift/rotation augmentation from
  5 epochs on, the best validation epoch kept.
* "recipe" (only with --sweep, used to choose the recipe): the same recipe rebuilt in-process
  from the tutorial's helpers, with one ingredient changed (peak_lr, warmup, rotation, shift,
  smoothing, bn_momentum, augment_from). Choices were made on the validation accuracy only.

The table shows: epochs, training seconds, seconds per epoch, test accuracy, the first epoch at
which validation accuracy reached 99%, and peak resident memory of the process. It is printed
and written as JSON (default benchmark.json).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_epoch_at_99(val_accuracy):
    """The first epoch (1-based) whose validation accuracy reached 99%, or None."""
    return next((epoch for epoch, value in enumerate(val_accuracy, 1) if value >= 0.99), None)


def worker(config):
    """Train one configuration in this process and print one JSON line with the results."""
    sys.path.insert(0, ROOT)
    import numpy as np
    import cnn_mnist_classifier as tutorial
    import keras
    import tensorflow as tf

    seed, epochs, kind = config["seed"], config["epochs"], config["kind"]
    batch_size = config.get("batch_size", tutorial.BATCH_SIZE)
    keras.utils.set_random_seed(seed)
    (x_train_all, y_train_all, x_test_raw, y_test), _ = tutorial.load_mnist(
        os.environ.get("MNIST_DATA_DIR"))
    (train_images, train_labels), (val_images, val_labels) = tutorial.split_train_validation(
        x_train_all, y_train_all, tutorial.VALIDATION_SPLIT, config.get("subset"), seed)
    x_train, x_val, x_test = (tutorial.preprocess_images(a)
                              for a in (train_images, val_images, x_test_raw))
    y_train = keras.utils.to_categorical(train_labels, 10)
    y_val = keras.utils.to_categorical(val_labels, 10)
    steps_per_epoch = -(-len(x_train) // batch_size)
    total_steps = steps_per_epoch * epochs

    if kind == "reference":
        model = tutorial.build_model()  # BatchNorm's default momentum 0.99
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                      metrics=["accuracy"])
        started = time.perf_counter()
        history = model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs,
                            validation_data=(x_val, y_val), verbose=0).history
        seconds = time.perf_counter() - started
    else:
        tf.config.experimental.enable_op_determinism()  # as the tutorial does on a CPU
        augmenter = tutorial.make_augmenter(config.get("rotation", tutorial.MAX_ROTATION_DEGREES),
                                            config.get("shift", tutorial.MAX_SHIFT_PIXELS), seed)
        if epochs < config.get("augment_from", tutorial.AUGMENT_FROM_EPOCHS):
            augmenter = None  # the tutorial's rule: short runs train on the plain images
        dataset = tutorial.make_training_dataset(x_train, y_train, batch_size, seed, augmenter)
        model = tutorial.build_model(config.get("bn_momentum",
                                                tutorial.batchnorm_momentum_for(total_steps)))
        schedule = tutorial.make_learning_rate_schedule(
            total_steps, config.get("peak_lr", tutorial.PEAK_LEARNING_RATE),
            config.get("warmup", tutorial.WARMUP_FRACTION))
        tutorial.compile_model(model, schedule, config.get("smoothing", tutorial.LABEL_SMOOTHING),
                               on_gpu=False)
        history, seconds = tutorial.train(model, dataset, (x_val, y_val), epochs)

    _, test_accuracy = model.evaluate(x_test, keras.utils.to_categorical(y_test, 10),
                                      batch_size=512, verbose=0)
    print("RESULT " + json.dumps({
        **config,
        "train_seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / epochs, 1),
        "val_accuracy": [round(v, 5) for v in history["val_accuracy"]],
        "best_val_accuracy": round(max(history["val_accuracy"]), 5),
        "test_accuracy": round(float(test_accuracy), 5),
        "first_epoch_val_99": first_epoch_at_99(history["val_accuracy"]),
        "peak_memory_mb": tutorial.peak_memory_mb(),
    }), flush=True)


def run_tutorial(config):
    """Run cnn_mnist_classifier.py itself, exactly as a user would, and read what it wrote."""
    import csv
    import tempfile
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, os.path.join(ROOT, "cnn_mnist_classifier.py"),
                   "--seed", str(config["seed"]), "--epochs", str(config["epochs"]),
                   "--output-dir", output_dir, "--no-show"]
        if os.environ.get("MNIST_DATA_DIR"):
            command += ["--data-dir", os.environ["MNIST_DATA_DIR"]]
        completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if completed.returncode != 0:
            sys.stderr.write(completed.stderr[-3000:])
            raise SystemExit(f"the tutorial failed for {config} (exit {completed.returncode})")
        with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as handle:
            metrics = json.load(handle)
        with open(os.path.join(output_dir, "history.csv"), encoding="utf-8") as handle:
            val_accuracy = [float(row["val_accuracy"]) for row in csv.DictReader(handle)]
    return {**config, "train_seconds": round(metrics["training_seconds"], 1),
            "seconds_per_epoch": round(metrics["training_seconds"] / config["epochs"], 1),
            "val_accuracy": [round(v, 5) for v in val_accuracy],
            "best_val_accuracy": round(max(val_accuracy), 5),
            "test_accuracy": metrics["test_accuracy"],
            "first_epoch_val_99": first_epoch_at_99(val_accuracy),
            "peak_memory_mb": metrics["peak_memory_mb"]}


def run_config(config):
    """Run one configuration in a fresh process; return its result dictionary."""
    if config["kind"] == "tutorial":
        return run_tutorial(config)
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(config)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.stderr.write(completed.stderr[-3000:])
    raise SystemExit(f"configuration {config} failed (exit {completed.returncode})")


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(results):
    header = (f"{'config':<10} {'seed':>4} {'epochs':>6} {'train s':>8} {'s/epoch':>8} "
              f"{'test acc':>9} {'val>=99% at':>11} {'peak MB':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        first = r["first_epoch_val_99"] if r["first_epoch_val_99"] is not None else "-"
        print(f"{r['kind']:<10} {r['seed']:>4} {r['epochs']:>6} {r['train_seconds']:>8.1f} "
              f"{r['seconds_per_epoch']:>8.1f} {100 * r['test_accuracy']:>8.2f}% "
              f"{first:>11} {r['peak_memory_mb']:>8.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true",
                        help="quick check: seed 1, one epoch of each (about 2 minutes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--output", default="benchmark.json", help="where to write the JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sweep", help=argparse.SUPPRESS)  # JSON list of recipe variants
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if not os.environ.get("MNIST_DATA_DIR"):
        print("note: MNIST_DATA_DIR is not set; the workers will download MNIST with Keras")
    if args.sweep:
        configs = json.loads(args.sweep)
    elif args.short:
        configs = [{"kind": "reference", "seed": 1, "epochs": 1},
                   {"kind": "tutorial", "seed": 1, "epochs": 1}]
    else:
        configs = []
        for seed in args.seeds:
            configs += [{"kind": "reference", "seed": seed, "epochs": 10},
                        {"kind": "tutorial", "seed": seed, "epochs": 10}]
        configs += [{"kind": "tutorial", "seed": 1, "epochs": 1},
                    {"kind": "tutorial", "seed": 1, "epochs": 3}]
    results = []
    for config in configs:
        print(f"running {config} ...", flush=True)
        results.append(run_config(config))
        print(f"  -> {json.dumps(results[-1])}", flush=True)
    print()
    print(f"Machine: {cpu_name()}, {os.cpu_count()} CPU cores, "
          f"Python {platform.python_version()}")
    print_table(results)
    by_kind = {}
    for r in results:
        if r["epochs"] == 10 or args.short or args.sweep:  # the default-settings rows
            by_kind.setdefault(r["kind"], []).append(r)
    summary = {}
    for kind, rows in by_kind.items():
        accuracies = sorted(r["test_accuracy"] for r in rows)
        summary[kind] = {"median_test_accuracy": accuracies[len(accuracies) // 2],
                         "mean_train_seconds": round(sum(r["train_seconds"] for r in rows)
                                                     / len(rows), 1)}
    for kind in ("tutorial", "recipe"):
        if "reference" in summary and kind in summary:
            summary[f"time_ratio_{kind}_over_reference"] = round(
                summary[kind]["mean_train_seconds"] / summary["reference"]["mean_train_seconds"],
                3)
    print(json.dumps(summary, indent=2))
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump({"machine": {"processor": cpu_name(), "cores": os.cpu_count(),
                               "python": platform.python_version()},
                   "results": results, "summary": summary}, handle, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
