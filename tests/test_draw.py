"""Drawing a digit: the window's own event handlers, a real window under Xvfb driven by the
real mouse (xdotool), and the notebook canvas's JavaScript in a real headless browser.

The Debian packages these tests need (xvfb, xdotool, imagemagick, chromium, chromium-driver)
are installed by tests/install.sh, which the README's test command and CI run first."""
import base64
import io
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import SCRIPT, script_env

# Mouse paths on the 280x280 pad, in pad pixels: one list of points per stroke.
STROKES = {
    1: [[(140, 40), (140, 240)]],
    7: [[(70, 50), (210, 50), (120, 240)]],
    0: [[(140 + 70 * math.sin(a), 140 - 100 * math.cos(a))
         for a in np.linspace(0, 2 * math.pi, 40)]],
    4: [[(90, 40), (70, 160), (200, 160)], [(170, 60), (170, 250)]],
}


def need(*programs):
    """The named programs, or a failure that says how to get them (never a silent skip)."""
    missing = [name for name in programs if not shutil.which(name)]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run `bash tests/install.sh` (Debian "
                    "packages xvfb, xdotool, imagemagick, chromium, chromium-driver)")


def smooth(points, steps=8):
    """The points of a stroke with `steps` positions on each segment, as a mouse sends them."""
    path = [points[0]]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        path += [(x0 + (x1 - x0) * f, y0 + (y1 - y0) * f) for f in np.linspace(0, 1, steps)[1:]]
    return path


@pytest.fixture(scope="module")
def trained_model(tutorial, quick_run):
    _, output_dir, _ = quick_run
    return tutorial.load_trained_model(str(output_dir / "mnist_cnn.keras"))


@pytest.fixture
def pad(tutorial, trained_model):
    import matplotlib.pyplot as plt
    plt.switch_backend("Agg")  # the handlers, without a screen
    drawing_pad = tutorial.DrawingPad(trained_model)
    yield drawing_pad
    plt.close(drawing_pad.parts["figure"])


def send(pad, name, x, y, button=1):
    """A mouse event at pad pixel (x, y), through the figure's own event handling."""
    from matplotlib.backend_bases import MouseEvent
    figure = pad.parts["figure"]
    px, py = pad.parts["pad"].transData.transform((x, y))
    figure.canvas.callbacks.process(name, MouseEvent(name, figure.canvas, px, py, button=button))


def draw_digit(pad, strokes):
    for stroke in strokes:
        path = smooth(stroke)
        send(pad, "button_press_event", *path[0])
        for point in path[1:]:
            send(pad, "motion_notify_event", *point)
        send(pad, "button_release_event", *path[-1])


@pytest.mark.parametrize("digit", [1, 7, 0, 4])
def test_mouse_strokes_on_the_pad_are_read_and_printed(pad, digit, capsys):
    assert pad.read() == "nothing drawn yet"  # an empty pad is not a prediction
    draw_digit(pad, STROKES[digit])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == len(STROKES[digit])  # one reading per stroke
    assert printed[-1].startswith(f"read: {digit} ("), printed
    heights = [bar.get_height() for bar in pad.parts["bar_list"]]
    assert int(np.argmax(heights)) == digit and abs(sum(heights) - 1) < 1e-3
    seen = pad.parts["digit_image"].get_array()
    assert seen.shape == (28, 28) and seen.max() == pytest.approx(1.0)
    maps = [image.get_array() for image in pad.parts["map_images"]]
    assert [m.shape[0] for m in maps] == [13, 5, 3]  # each block's maps, side by side


def test_right_button_and_clear_button_clear_the_pad(pad, capsys):
    draw_digit(pad, STROKES[1])
    send(pad, "button_press_event", 140, 140, button=3)
    assert not np.asarray(pad.picture).any()
    assert pad.parts["pad"].get_title().startswith("nothing drawn yet")
    assert max(bar.get_height() for bar in pad.parts["bar_list"]) == 0
    draw_digit(pad, STROKES[7])
    from matplotlib.backend_bases import MouseEvent
    figure, button = pad.parts["figure"], pad.clear_button.ax
    x, y = button.transAxes.transform((0.5, 0.5))  # a click in the middle of "Clear"
    for name in ("button_press_event", "button_release_event"):
        figure.canvas.callbacks.process(name, MouseEvent(name, figure.canvas, x, y, button=1))
    assert not np.asarray(pad.picture).any()


def test_a_dot_is_not_read_as_a_digit(pad, capsys):
    send(pad, "button_press_event", 140, 140)
    send(pad, "button_release_event", 140, 140)
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("read: ")  # a reading, or "nothing" with the recipe's reason
    assert "Traceback" not in printed


def test_draw_without_a_screen_says_so(quick_run):
    _, output_dir, _ = quick_run
    model = str(output_dir / "mnist_cnn.keras")
    for env in ({"DISPLAY": None, "WAYLAND_DISPLAY": None, "MPLBACKEND": None},
                {"DISPLAY": ":0", "MPLBACKEND": "Agg"}):
        started = time.perf_counter()
        completed = subprocess.run([sys.executable, SCRIPT, "--draw", "--model", model],
                                   capture_output=True, text=True, timeout=120,
                                   env=script_env(env))
        assert completed.returncode == 1
        assert "--draw needs a screen" in completed.stderr and "--predict" in completed.stderr
        assert "Traceback" not in completed.stderr
        assert time.perf_counter() - started < 60  # no wait for a window


def test_draw_with_a_missing_or_broken_model_gives_the_predict_messages(tmp_path):
    """With a screen (Xvfb), a model that is not there or not a model: --predict's messages."""
    (tmp_path / "broken.keras").write_bytes(b"not a zip file")
    server, display = start_xvfb()
    try:
        for name, message in (("none.keras", "no trained model at"),
                              ("broken.keras", "is not a Keras model this script can load")):
            completed = subprocess.run(
                [sys.executable, SCRIPT, "--draw", "--model", str(tmp_path / name)],
                capture_output=True, text=True, timeout=120,
                env=script_env({"DISPLAY": display, "MPLBACKEND": None}))
            assert completed.returncode == 1 and "Traceback" not in completed.stderr
            assert message in completed.stderr, completed.stderr
    finally:
        server.kill()


# ---------------------------------------------------------------- a real window, a real mouse
def start_xvfb():
    need("Xvfb", "xdotool", "import")
    server = subprocess.Popen(["Xvfb", "-displayfd", "1", "-screen", "0", "1400x900x24",
                               "-nolisten", "tcp"], stdout=subprocess.PIPE, text=True)
    return server, ":" + server.stdout.readline().strip()


def lines_of(stream):
    """The lines a process prints, as a queue filled by a thread."""
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    return lines


def wait_for_line(lines, prefix, timeout):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no line starting {prefix!r} within {timeout} s; got {seen}")


def screenshot(display, path):
    subprocess.run(["import", "-display", display, "-window", "root", str(path)], check=True,
                   timeout=30)
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_real_window_under_xvfb_reads_a_digit_drawn_with_the_mouse(tutorial, quick_run,
                                                                    tmp_path):
    _, output_dir, _ = quick_run
    server, display = start_xvfb()
    env = script_env({"DISPLAY": display, "MPLBACKEND": None})
    app = subprocess.Popen([sys.executable, SCRIPT, "--draw", "--model",
                            str(output_dir / "mnist_cnn.keras")], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = lines_of(app.stdout)
        wait_for_line(lines, "Draw a digit", 120)
        window = subprocess.run(["xdotool", "search", "--sync", "--name", "Draw a digit"],
                                capture_output=True, text=True, env=env, timeout=60
                                ).stdout.split()[0]
        geometry = dict(line.split("=") for line in subprocess.run(
            ["xdotool", "getwindowgeometry", "--shell", window], capture_output=True,
            text=True, env=env, timeout=30).stdout.split())
        left, top, width, height = (int(geometry[key]) for key in ("X", "Y", "WIDTH", "HEIGHT"))
        time.sleep(1)
        before = screenshot(display, tmp_path / "before.png")

        def on_screen(x, y, rect=tutorial.PAD_RECT):  # pad pixels -> screen pixels
            fx = rect[0] + rect[2] * x / tutorial.PAD_SIZE
            fy = rect[1] + rect[3] * (1 - y / tutorial.PAD_SIZE)
            return str(round(left + fx * width)), str(round(top + (1 - fy) * height))

        path = smooth(STROKES[7][0], steps=12)
        command = ["xdotool", "mousemove", *on_screen(*path[0]), "mousedown", "1"]
        for point in path[1:]:
            command += ["mousemove", *on_screen(*point), "sleep", "0.03"]
        subprocess.run(command + ["mouseup", "1"], check=True, env=env, timeout=60)
        assert wait_for_line(lines, "read: ", 30).startswith("read: 7 (")
        time.sleep(1)
        after = screenshot(display, tmp_path / "after.png")

        def region(image, rect):  # a figure rectangle (left, bottom, width, height)
            x0, x1 = left + rect[0] * width, left + (rect[0] + rect[2]) * width
            y0, y1 = top + (1 - rect[1] - rect[3]) * height, top + (1 - rect[1]) * height
            return image[int(y0):int(y1), int(x0):int(x1)]
        bars = (0.46, 0.12, 0.16, 0.3)
        blue = np.all(np.abs(region(after, bars) - (31, 119, 180)) < 30, axis=-1)
        assert blue.sum() > 200, "the tallest bar is drawn in blue"
        assert not np.all(np.abs(region(before, bars) - (31, 119, 180)) < 30, axis=-1).any()
        assert (region(after, tutorial.PAD_RECT) > 200).all(axis=-1).sum() > 2000  # the ink
        subprocess.run(["xdotool", "key", "q"], check=True, env=env, timeout=30)  # closes it
        assert app.wait(timeout=30) == 0
        assert "Traceback" not in app.stderr.read()
    finally:
        app.kill()
        server.kill()


# ---------------------------------------------------------------- the notebook canvas
BROWSER_STUB = """<script>
window.google = {colab: {kernel: {invokeFunction(name, args, kwargs) {
  window.sent = {name: name, args: args};
  return new Promise(resolve => {
    window.reply = json => resolve({data: {"application/json": json}}); });
}}}};
</script>"""


def browser_page(tutorial, kind):
    """A page with the canvas as Colab shows it (google.colab stubbed), or as the Jupyter
    widget's module renders it (anywidget's model stubbed)."""
    if kind == "colab":
        return "<html><body>" + BROWSER_STUB + tutorial.colab_canvas_html() + "</body></html>"
    return WIDGET_PAGE % base64.b64encode(tutorial.WIDGET_JS.encode()).decode()


@pytest.mark.parametrize("kind", ["colab", "widget"])
def test_canvas_in_a_real_browser_sends_a_drawing_the_recipe_reads(tutorial, trained_model,
                                                                    tmp_path, kind):
    need("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    page = tmp_path / "canvas.html"
    page.write_text(browser_page(tutorial, kind), encoding="utf-8")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        browser.get(page.as_uri())
        canvas = WebDriverWait(browser, 10).until(lambda b: b.find_element(By.TAG_NAME, "canvas"))
        assert browser.find_element(By.CLASS_NAME, "text").text == "nothing drawn yet"
        path = smooth(STROKES[7][0])
        half = tutorial.PAD_SIZE / 2
        actions = ActionChains(browser).move_to_element_with_offset(
            canvas, int(path[0][0] - half), int(path[0][1] - half)).click_and_hold()
        for (x0, y0), (x1, y1) in zip(path, path[1:]):
            actions.move_by_offset(int(round(x1 - x0)), int(round(y1 - y0)))
        actions.release().perform()
        sent = WebDriverWait(browser, 10).until(lambda b: b.execute_script("return window.sent"))
        if kind == "colab":
            assert sent["name"] == "mnist.read"
            sent = sent["args"][0]
        assert sent.startswith("data:image/png;base64,")
        from PIL import Image
        drawing = Image.open(io.BytesIO(base64.b64decode(sent.split(",")[1])))
        assert drawing.size == (tutorial.PAD_SIZE, tutorial.PAD_SIZE)
        digit, _ = tutorial.prepare_digit(drawing)  # the shared recipe: an MNIST-style digit
        assert digit.shape == (28, 28) and digit.max() == pytest.approx(1.0)
        reading = tutorial.read_png_drawing(tutorial.reading_model(trained_model), sent)
        assert reading["text"].startswith("read: 7 ("), reading["text"]
        browser.execute_script("window.reply(arguments[0])", reading)  # Python's answer
        WebDriverWait(browser, 10).until(
            lambda b: b.find_element(By.CLASS_NAME, "text").text.startswith("read: 7"))
        assert len(browser.find_elements(By.CSS_SELECTOR, ".bars > div")) == 10
        assert browser.find_element(By.CLASS_NAME, "digit").get_attribute("src").startswith(
            "data:image/png;base64,")
        browser.find_element(By.TAG_NAME, "button").click()
        assert browser.find_element(By.CLASS_NAME, "text").text == "nothing drawn yet"
    finally:
        browser.quit()


def test_colab_callback_returns_the_reading(tutorial, trained_model, monkeypatch):
    """show_canvas_in_colab with only google.colab stubbed: it registers a callback that turns
    a PNG data URL into the reading the page shows."""
    import types
    registered = {}
    colab = types.ModuleType("google.colab")
    colab.output = types.SimpleNamespace(register_callback=lambda name, f: registered.update(
        {name: f}))
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    tutorial.show_canvas_in_colab(trained_model)
    from PIL import Image, ImageDraw
    picture = Image.new("L", (tutorial.PAD_SIZE, tutorial.PAD_SIZE))
    ImageDraw.Draw(picture).line(smooth(STROKES[1][0]), fill=255, width=tutorial.BRUSH_WIDTH)
    reading = registered["mnist.read"](png_data_url(picture)).data
    assert reading["text"].startswith("read: 1 (") and len(reading["probabilities"]) == 10
    blank = Image.new("L", (tutorial.PAD_SIZE, tutorial.PAD_SIZE))
    empty = registered["mnist.read"](png_data_url(blank)).data
    assert empty == {"text": "nothing drawn yet"}


def png_data_url(picture):
    png = io.BytesIO()
    picture.save(png, format="PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()


def test_jupyter_widget_reads_what_its_canvas_sends(tutorial, trained_model):
    """The anywidget: a drawing arriving in its `png` value comes back as its `reading`."""
    from PIL import Image, ImageDraw
    widget = tutorial.show_canvas_widget(trained_model)
    picture = Image.new("L", (tutorial.PAD_SIZE, tutorial.PAD_SIZE))
    ImageDraw.Draw(picture).line(smooth(STROKES[7][0]), fill=255, width=tutorial.BRUSH_WIDTH)
    widget.png = png_data_url(picture)
    assert widget.reading["text"].startswith("read: 7 (")
    assert "export default" in widget._esm and "drawingPad" in widget._esm


WIDGET_PAGE = """<html><body><div id="widget"></div><script type="module">
const values = {}, listeners = {};
const model = {  // what anywidget hands to render(): a stand-in that records what is sent
  get: name => values[name], set: (name, value) => { values[name] = value; },
  save_changes: () => { window.sent = values.png; },
  on: (event, callback) => { listeners[event] = callback; },
};
window.reply = reading => { values.reading = reading; listeners["change:reading"](); };
const module = await import("data:text/javascript;base64," + "%s");
module.default.render({model: model, el: document.getElementById("widget")});
</script></body></html>"""
