"""Make photo-like pictures of hand-drawn digits, to try `--predict` the way a user would.

Not collected by pytest. Each digit 0-9 is drawn as pen strokes (polylines with a wobbly hand,
varying slant, size and pen width), on paper with uneven light, camera noise and blur, somewhere
off-centre on a phone-sized canvas, saved as JPEG (dark ink on light paper) and some as PNG
(light chalk on a dark board). Unlike the tests, these are not MNIST digits at all.

    python tests/make_user_photos.py OUTPUT_DIR [--per-digit 3]
    python cnn_mnist_classifier.py --predict OUTPUT_DIR/*.jpg OUTPUT_DIR/*.png

The true digit is the first character of each file name.
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

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


def draw_photo(digit, rng, dark_on_light=True):
    width, height = int(rng.integers(800, 1600)), int(rng.integers(600, 1200))
    size = int(rng.integers(150, min(width, height) // 2))
    left = int(rng.integers(20, width - size - 20))
    top = int(rng.integers(20, height - size - 20))
    slant = rng.uniform(-0.25, 0.25)
    pen = max(3, int(size * rng.uniform(0.06, 0.12)))
    ink = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(ink)
    for stroke in STROKES[digit]:
        wobbly = np.asarray(stroke) + rng.normal(0, 0.03, (len(stroke), 2))
        curve = smooth(wobbly)
        xs = left + size * (0.15 + 0.7 * curve[:, 0] + slant * (1 - curve[:, 1]))
        ys = top + size * curve[:, 1]
        draw.line(list(zip(xs, ys)), fill=255, width=pen, joint="curve")
        for x, y in ((xs[0], ys[0]), (xs[-1], ys[-1])):  # round pen ends
            draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=255)
    ink = np.asarray(ink.filter(ImageFilter.GaussianBlur(pen / 6)), np.float32) / 255
    ys, xs = np.mgrid[0:height, 0:width]
    light = 0.65 + 0.25 * xs / width + 0.1 * np.sin(ys / height * 3)  # lamp and a paper fold
    if dark_on_light:
        grey = light * (1 - 0.75 * ink)
        tint = np.array([1.0, 0.96, 0.88])
    else:  # chalk on a board
        grey = 0.12 + 0.08 * xs / width + 0.7 * ink
        tint = np.array([0.9, 1.0, 0.95])
    grey = grey + rng.normal(0, 0.035, grey.shape)
    rgb = np.clip(grey[..., None] * tint, 0, 1)
    return Image.fromarray((rgb * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir")
    parser.add_argument("--per-digit", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for digit in range(10):
        for copy in range(args.per_digit):
            chalk = copy == args.per_digit - 1 and args.per_digit > 2
            photo = draw_photo(digit, rng, dark_on_light=not chalk)
            name = f"{digit}_{copy}.{'png' if chalk else 'jpg'}"
            photo.save(os.path.join(args.output_dir, name), quality=80)
    print(f"wrote {10 * args.per_digit} pictures to {args.output_dir}")


if __name__ == "__main__":
    main()
