"""The MNIST readers: good files load, and every kind of bad file gives a plain message."""
import gzip
import os

import numpy as np
import pytest

from conftest import run_script


def idx_images(images, magic=0x803):
    count, rows, cols = images.shape
    header = b"".join(n.to_bytes(4, "big") for n in (magic, count, rows, cols))
    return header + images.astype(np.uint8).tobytes()


def idx_labels(labels, magic=0x801):
    return magic.to_bytes(4, "big") + len(labels).to_bytes(4, "big") + \
        labels.astype(np.uint8).tobytes()


def write_mnist_folder(folder, train=12, test=5, compress=True, **overrides):
    """Write a tiny but well-formed MNIST in IDX format; `overrides` replaces a file's bytes."""
    rng = np.random.default_rng(0)
    contents = {
        "train-images-idx3-ubyte": idx_images(rng.integers(0, 256, (train, 28, 28))),
        "train-labels-idx1-ubyte": idx_labels(rng.integers(0, 10, train)),
        "t10k-images-idx3-ubyte": idx_images(rng.integers(0, 256, (test, 28, 28))),
        "t10k-labels-idx1-ubyte": idx_labels(rng.integers(0, 10, test)),
    }
    contents.update({name.replace("_", "-"): data for name, data in overrides.items()})
    os.makedirs(folder, exist_ok=True)
    for name, data in contents.items():
        if compress:
            with gzip.open(os.path.join(folder, name + ".gz"), "wb") as handle:
                handle.write(data)
        else:
            with open(os.path.join(folder, name), "wb") as handle:
                handle.write(data)
    return contents


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder_loads(tutorial, tmp_path, compress):
    contents = write_mnist_folder(tmp_path, compress=compress)
    (x_train, y_train, x_test, y_test), source = tutorial.load_mnist_from_folder(str(tmp_path))
    assert x_train.shape == (12, 28, 28) and x_train.dtype == np.uint8
    assert y_train.shape == (12,) and x_test.shape == (5, 28, 28) and y_test.shape == (5,)
    assert x_train.tobytes() == contents["train-images-idx3-ubyte"][16:]
    assert "IDX" in source


def test_idx_dotted_file_names_are_accepted(tutorial, tmp_path):
    write_mnist_folder(tmp_path, compress=False)
    for name in os.listdir(tmp_path):
        os.rename(tmp_path / name, tmp_path / name.replace("-idx", ".idx"))
    (x_train, _, _, _), _ = tutorial.load_mnist_from_folder(str(tmp_path))
    assert len(x_train) == 12


def test_truncated_idx_file_is_reported(tutorial, tmp_path):
    good = idx_images(np.zeros((12, 28, 28)))
    write_mnist_folder(tmp_path, train_images_idx3_ubyte=good[:-100])
    with pytest.raises(tutorial.DataError, match="truncated"):
        tutorial.load_mnist_from_folder(str(tmp_path))


def test_truncated_gzip_is_reported(tutorial, tmp_path):
    write_mnist_folder(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(tutorial.DataError, match="gzip"):
        tutorial.load_mnist_from_folder(str(tmp_path))


def test_wrong_magic_number_is_reported(tutorial, tmp_path):
    write_mnist_folder(tmp_path, t10k_labels_idx1_ubyte=idx_labels(np.zeros(5), magic=0x1234))
    with pytest.raises(tutorial.DataError, match="magic number"):
        tutorial.load_mnist_from_folder(str(tmp_path))


def test_wrong_image_size_is_reported(tutorial, tmp_path):
    write_mnist_folder(tmp_path, train_images_idx3_ubyte=idx_images(np.zeros((12, 32, 32))))
    with pytest.raises(tutorial.DataError, match="28x28"):
        tutorial.load_mnist_from_folder(str(tmp_path))


def test_counts_that_disagree_are_reported(tutorial, tmp_path):
    write_mnist_folder(tmp_path, train_labels_idx1_ubyte=idx_labels(np.zeros(11)))
    with pytest.raises(tutorial.DataError, match="counts must agree"):
        tutorial.load_mnist_from_folder(str(tmp_path))


def test_label_out_of_range_is_reported(tutorial, tmp_path):
    write_mnist_folder(tmp_path, t10k_labels_idx1_ubyte=idx_labels(np.full(5, 12)))
    with pytest.raises(tutorial.DataError, match="0-9"):
        tutorial.load_mnist_from_folder(str(tmp_path))


def test_missing_files_are_named(tutorial, tmp_path):
    write_mnist_folder(tmp_path)
    os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(tutorial.DataError, match="train-labels-idx1-ubyte.gz"):
        tutorial.load_mnist_from_folder(str(tmp_path))


def test_npz_loads(tutorial, tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "mnist.npz", x_train=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
             y_train=rng.integers(0, 10, 8), x_test=np.zeros((3, 28, 28), np.uint8),
             y_test=np.arange(3))
    (x_train, y_train, x_test, y_test), source = tutorial.load_mnist_from_folder(str(tmp_path))
    assert x_train.shape == (8, 28, 28) and list(y_test) == [0, 1, 2]
    assert source.endswith("mnist.npz")


def test_npz_with_missing_key_is_reported(tutorial, tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 28, 28), np.uint8),
             y_train=np.zeros(2, np.uint8))
    with pytest.raises(tutorial.DataError, match="x_test"):
        tutorial.load_mnist_from_folder(str(tmp_path))


def test_npz_with_pickled_objects_is_refused(tutorial, tmp_path):
    objects = np.array([{"not": "an image"}] * 2, dtype=object)
    np.savez(tmp_path / "mnist.npz", x_train=objects, y_train=objects, x_test=objects,
             y_test=objects)
    with pytest.raises(tutorial.DataError, match="not a readable mnist.npz"):
        tutorial.load_mnist_from_folder(str(tmp_path))


def test_npz_with_disagreeing_counts_is_reported(tutorial, tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((4, 28, 28), np.uint8),
             y_train=np.zeros(3, np.uint8), x_test=np.zeros((2, 28, 28), np.uint8),
             y_test=np.zeros(2, np.uint8))
    with pytest.raises(tutorial.DataError, match="counts must agree"):
        tutorial.load_mnist_from_folder(str(tmp_path))


def test_bad_data_folder_ends_the_run_with_a_message_not_a_traceback(tmp_path):
    good = idx_images(np.zeros((12, 28, 28)))
    write_mnist_folder(tmp_path / "data", train_images_idx3_ubyte=good[:1000])
    completed = run_script(["--quick", "--no-show", "--data-dir", str(tmp_path / "data"),
                            "--output-dir", str(tmp_path / "out")])
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert "truncated" in completed.stderr and "--data-dir" in completed.stderr


def test_no_network_gives_a_clear_message(tmp_path):
    """No local data and no way to download: say so and say what to do (no network used)."""
    blackhole = "http://127.0.0.1:9"  # nothing listens there: every download fails at once
    env = {"KERAS_HOME": str(tmp_path / "keras_home"), "MNIST_DATA_DIR": "",
           "HTTPS_PROXY": blackhole, "HTTP_PROXY": blackhole, "https_proxy": blackhole,
           "http_proxy": blackhole, "NO_PROXY": "", "no_proxy": ""}
    completed = run_script(["--quick", "--no-show", "--output-dir", str(tmp_path / "out")],
                           env_overrides=env, timeout=300)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert "could not download MNIST" in completed.stderr
    assert "--data-dir" in completed.stderr


def test_corrupted_gzip_is_reported(tutorial, tmp_path):
    """Not truncated but damaged inside (zlib's own error): still a plain message."""
    write_mnist_folder(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(tutorial.DataError, match="gzip"):
        tutorial.load_mnist_from_folder(str(tmp_path))


def test_balanced_subset_tops_up_when_a_digit_runs_out(tutorial):
    labels = np.repeat(np.arange(10), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    chosen = tutorial.balanced_subset_indices(labels, 60_000, np.random.default_rng(0))
    assert len(chosen) == len(set(chosen)) == 60_000


def save_npz(folder, changes=None):
    """A small mnist.npz with uint8 images and integer labels, some arrays replaced."""
    rng = np.random.default_rng(5)
    arrays = {"x_train": rng.integers(0, 256, (6, 28, 28)).astype(np.uint8),
              "y_train": rng.integers(0, 10, 6), "x_test": rng.integers(0, 256, (4, 28, 28)).astype(np.uint8),
              "y_test": np.arange(4)}
    original = dict(arrays)
    arrays.update(changes(arrays) if callable(changes) else {})
    np.savez(folder / "mnist.npz", **arrays)
    return original


@pytest.mark.parametrize("name, change", [
    ("floats 0-1 (pixels / 255)", lambda a: {"x_train": a["x_train"].astype(np.float32) / 255}),
    ("floats 0-255, whole numbers", lambda a: {"x_test": a["x_test"].astype(np.float64)}),
    ("int64 images 0-255", lambda a: {"x_train": a["x_train"].astype(np.int64)}),
    ("float labels, whole numbers", lambda a: {"y_train": a["y_train"].astype(np.float32)}),
    ("uint8 labels", lambda a: {"y_test": a["y_test"].astype(np.uint8)}),
])
def test_arrays_with_an_exact_meaning_load_exactly(tutorial, tmp_path, name, change):
    original = save_npz(tmp_path, changes=change)
    (x_train, y_train, x_test, y_test), _ = tutorial.load_mnist_from_folder(str(tmp_path))
    assert x_train.dtype == np.uint8 and x_test.dtype == np.uint8, name
    assert np.array_equal(x_train, original["x_train"]) and np.array_equal(x_test, original["x_test"])
    assert np.array_equal(y_train, original["y_train"]) and np.array_equal(y_test, original["y_test"])


@pytest.mark.parametrize("name, change, message", [
    ("floats beyond 255", lambda a: {"x_train": a["x_train"] * 2.5},
     "x_train holds values from 0 to"),
    ("other integer range", lambda a: {"x_test": a["x_test"].astype(np.int16) * 4},
     "x_test holds values from 0 to"),
    ("fractional labels", lambda a: {"y_train": a["y_train"] + 0.5}, "y_train holds values"),
    ("labels above 9", lambda a: {"y_test": a["y_test"] + 7}, "y_test holds values"),
    ("flattened images", lambda a: {"x_train": a["x_train"].reshape(6, 784)},
     "x_train has shape (6, 784)"),
    ("one-hot labels", lambda a: {"y_train": np.eye(10)[a["y_train"]]},
     "y_train has shape (6, 10)"),
    ("text", lambda a: {"y_test": np.array(["1", "2", "3", "4"])}, "y_test has shape (4,)"),
    ("negative floats", lambda a: {"x_train": a["x_train"] / 255 - 0.5},
     "x_train holds values from -0.5"),
])
def test_arrays_without_an_exact_meaning_are_refused(tutorial, tmp_path, name, change, message):
    save_npz(tmp_path, changes=change)
    with pytest.raises(tutorial.DataError) as refused:
        tutorial.load_mnist_from_folder(str(tmp_path))
    text = str(refused.value)
    assert message in text and "mnist.npz" in text and "expected" in text, (name, text)
    assert "\n" not in text
