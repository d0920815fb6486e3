"""Make pictures of handwritten digits of several kinds, to try `--predict` the way a user would.

Not collected by pytest (the tests import it). Kinds (`KINDS`):

* scan: clean scans of thick, soft handwriting that fills much of the image. The handwriting is
  MNIST *test* digits (real writers, never trained on), enlarged smoothly; without the MNIST
  files, pen-stroke digits drawn with a thick soft marker.
* shadow: phone photos in strongly uneven light with a shadow edge across the page.
* pen: thin pen strokes on a large photo.
* board: light chalk on a dark, unevenly lit board.
* even: marker digits photographed on evenly lit paper.
* typeset: printed digits in a typeface.

Pen-stroke digits are polylines with a wobbly hand and varying slant and size (not MNIST).

    python tests/make_user_photos.py OUTPUT_DIR [--per-digit 3] [--kind pen] [--mnist-dir DIR]
    python cnn_mnist_classifier.py --predict OUTPUT_DIR

The true digit is the first character of each file name.
"""
import argparse
import gzip
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

KINDS = ("scan", "shadow", "pen", "board", "even", "typeset")

# Each digit as strokes in a unit box (x right, y down), the way people commonly write them.
STROKES = {
    0: [[(0.5, 0.0), (0.15, 0.2), (0.1, 0.6), (0.3, 0.95), (0.7, 0.95), (0.9, 0.55),
         (0.85, 0.15), (0.5, 0.0)]],
    1: [[(0.3, 0.2), (0.55, 0.0), (0.55, 1.0)]],
    2: [[(0.1, 0.25), (0.35, 0.02), (0.75, 0.05), (0.85, 0.3), (0.6, 0.6), (0.1, 1.0),
         (0.9, 1.0)]],
    3: [[(0.1, 0.1), (0.5, 0.0), (0.85, 0.2), (0.5, 0.48), (0.9, 0.72), (0.55, 1.0),
         (0.1, 0.9)]],
    4: [[(0.65, 1.0), (0.65, 0.0), (0.05, 0.65), (0.95, 0.65)]],
    5: [[(0.85, 0.0), (0.2, 0.0), (0.15, 0.45), (0.6, 0.4), (0.9, 0.65), (0.7, 0.95),
         (0.15, 0.95)]],
    6: [[(0.75, 0.0), (0.3, 0.3), (0.12, 0.7), (0.35, 1.0), (0.75, 0.9), (0.8, 0.6),
         (0.45, 0.5), (0.15, 0.7)]],
    7: [[(0.05, 0.02), (0.95, 0.02), (0.45, 1.0)]],
    8: [[(0.5, 0.48), (0.15, 0.25), (0.5, 0.0), (0.85, 0.25), (0.5, 0.48), (0.12, 0.75),
         (0.5, 1.0), (0.88, 0.75), (0.5, 0.48)]],
    9: [[(0.85, 0.35), (0.5, 0.55), (0.15, 0.35), (0.4, 0.02), (0.85, 0.15), (0.85, 0.35),
         (0.8, 1.0)]],
}


def smooth(points, samples=12):
    """Catmull-Rom through the points, so strokes curve like a pen's."""
    points = np.asarray(points, float)
    padded = np.vstack([points[0], points, points[-1]])
    curve = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1:i + 3]
        for t in np.linspace(0, 1, samples, endpoint=False):
            curve.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                                + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    curve.append(points[-1])
    return np.array(curve)


def stroke_ink(digit, size, pen, rng):
    """A pen-stroke digit as ink (0-1) on a size x size square."""
    ink = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(ink)
    slant = rng.uniform(-0.25, 0.25)
    for stroke in STROKES[digit]:
        curve = smooth(np.asarray(stroke) + rng.normal(0, 0.03, (len(stroke), 2)))
        xs = size * (0.15 + 0.7 * curve[:, 0] + slant * (1 - curve[:, 1]))
        ys = size * (0.05 + 0.9 * curve[:, 1])
        draw.line(list(zip(xs, ys)), fill=255, width=pen, joint="curve")
        for x, y in ((xs[0], ys[0]), (xs[-1], ys[-1])):  # round pen ends
            draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=255)
    return np.asarray(ink.filter(ImageFilter.GaussianBlur(max(0.5, pen / 6))), np.float32) / 255


def mnist_ink(image, size):
    """An MNIST digit (28x28 uint8), cropped to its ink and enlarged smoothly so that its
    longer side is `size`: soft, thick strokes."""
    rows, cols = np.nonzero(image > 0)
    crop = image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = size / max(crop.shape)
    big = Image.fromarray(crop).resize((max(1, round(crop.shape[1] * scale)),
                                        max(1, round(crop.shape[0] * scale))),
                                       Image.Resampling.BICUBIC)
    return np.asarray(big.filter(ImageFilter.GaussianBlur(size / 90)), np.float32) / 255


def typeset_ink(digit, size, rng):
    font = ImageFont.load_default(size=int(size * rng.uniform(0.7, 0.9)))
    ink = Image.new("L", (size, size), 0)
    ImageDraw.Draw(ink).text((size / 2, size / 2), str(digit), fill=255, font=font, anchor="mm")
    return np.asarray(ink, np.float32) / 255


def place(ink, height, width, rng):
    """The ink somewhere on a height x width canvas."""
    canvas = np.zeros((height, width), np.float32)
    top = int(rng.integers(0, height - ink.shape[0] + 1))
    left = int(rng.integers(0, width - ink.shape[1] + 1))
    canvas[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
    return canvas


def shadow_light(height, width, rng):
    """Light falling off across the page, and a soft shadow edge (a hand, a phone) across it."""
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xs + np.sin(angle) * ys
    light = 0.95 - 0.35 * (ramp - ramp.min()) / (ramp.max() - ramp.min())
    edge_angle, offset = rng.uniform(0, 2 * np.pi), rng.uniform(-0.15, 0.15)
    distance = (np.cos(edge_angle) * (xs - 0.5) + np.sin(edge_angle) * (ys - 0.5) - offset)
    softness = rng.uniform(0.005, 0.03)
    shade = 1 - rng.uniform(0.4, 0.55) / (1 + np.exp(-distance / softness))
    return light * shade


def make_picture(kind, digit, rng, mnist_image=None):
    """One picture of `digit` of the given kind, as a PIL image."""
    if kind == "scan":
        size = int(rng.integers(180, 320))
        ink = (mnist_ink(mnist_image, size) if mnist_image is not None
               else stroke_ink(digit, size, int(size * 0.13), rng))
        margin = int(size * rng.uniform(0.03, 0.15))  # the digit fills most of the scan
        ink = place(ink, size + margin, size + int(margin * rng.uniform(0.5, 1.5)), rng)
        grey = rng.uniform(0.9, 0.97) * (1 - rng.uniform(0.75, 0.9) * ink)
        noise, tint = 0.01, np.array([1.0, 1.0, 1.0])
    elif kind in ("shadow", "board"):
        height, width = int(rng.integers(600, 900)), int(rng.integers(700, 1100))
        size = int(min(height, width) * rng.uniform(0.3, 0.5))
        ink = (mnist_ink(mnist_image, size) if mnist_image is not None
               else stroke_ink(digit, size, int(size * 0.1), rng))
        ink = place(ink, height, width, rng)
        if kind == "shadow":
            grey = shadow_light(height, width, rng) * (1 - 0.8 * ink)
            noise, tint = 0.03, np.array([1.0, 0.96, 0.88])
        else:
            ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
            board = 0.12 + 0.1 * xs + 0.05 * ys
            chalk = ink * rng.uniform(0.55, 0.75) * (1 + 0.25 * rng.normal(0, 1, ink.shape))
            grey = board + np.clip(chalk, 0, 1)
            noise, tint = 0.03, np.array([0.9, 1.0, 0.95])
    else:
        height, width = int(rng.integers(700, 1200)), int(rng.integers(900, 1500))
        size = int(rng.integers(200, min(height, width) // 2))
        if kind == "typeset":
            ink = typeset_ink(digit, size, rng)
        else:
            pen = int(rng.integers(2, 5)) if kind == "pen" else int(size * rng.uniform(0.07, 0.1))
            ink = stroke_ink(digit, size, pen, rng)
        ink = place(ink, height, width, rng)
        ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
        light = 0.8 + (0.1 * xs - 0.05 * ys if kind == "pen" else 0.0)
        grey = light * (1 - 0.8 * ink)
        noise, tint = 0.02, np.array([1.0, 0.97, 0.92])
    grey = grey + rng.normal(0, noise, grey.shape)
    rgb = np.clip(grey[..., None] * tint, 0, 1)
    return Image.fromarray((rgb * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))


def load_mnist_test_images(mnist_dir):
    """The MNIST test images and labels from the original gzipped IDX files."""
    with gzip.open(os.path.join(mnist_dir, "t10k-images-idx3-ubyte.gz")) as handle:
        images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(mnist_dir, "t10k-labels-idx1-ubyte.gz")) as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8)
    return images, labels


def make_set(kind, per_digit, seed=0, mnist_dir=None):
    """[(digit, picture)] with `per_digit` pictures of each digit 0-9."""
    rng = np.random.default_rng(seed)
    images, labels = load_mnist_test_images(mnist_dir) if mnist_dir else (None, None)
    pictures = []
    for digit in range(10):
        chosen = rng.permutation(np.flatnonzero(labels == digit))[:per_digit] if mnist_dir \
            else [None] * per_digit
        for index in chosen:
            mnist_image = images[index] if index is not None else None
            pictures.append((digit, make_picture(kind, digit, rng, mnist_image)))
    return pictures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("--per-digit", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", choices=KINDS + ("all",), default="all")
    parser.add_argument("--mnist-dir", default=os.environ.get("MNIST_DATA_DIR"),
                        help="MNIST's IDX files: the scan, shadow and board kinds use its test "
                        "digits (default: $MNIST_DATA_DIR)")
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    for number, kind in enumerate(kinds):
        for copy, (digit, picture) in enumerate(make_set(kind, args.per_digit,
                                                         args.seed + number, args.mnist_dir)):
            extension = "png" if kind in ("board", "typeset") else "jpg"
            picture.save(os.path.join(args.output_dir, f"{digit}_{kind}_{copy}.{extension}"),
                         quality=85)
    print(f"wrote {10 * args.per_digit * len(kinds)} pictures to {args.output_dir}")


if __name__ == "__main__":
    main()
