"""Run report and `tunelab compare`: the numbers on the pages are the run's numbers, diagnostics
render from their documented shape (or say how to run them), compare forces and checks the budget,
and both pages render in headless Chromium without console errors."""
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import pytest
import yaml

import tunelab
from tunelab import compare
from tunelab.errors import ConfigError
from tunelab.report import FORCED, text_table, write_report
from tunelab.report import svg


# ----------------------------------------------------------------------------- tiny runs

def run_cfg(tiny, data, out, method=None, **train):
    return {"model": {"name": str(tiny)}, "data": {"train": str(data), "eval": str(data), "max_length": 64},
            "method": method or {"name": "lora", "r": 2},
            "train": {"steps": 3, "micro_batch_size": 4, "lr": 5e-3, "save_every": 0, "progress": False, **train},
            "eval": {"num_examples": 2, "max_new_tokens": 3, "every": 2},
            "diagnostics": {"after_train": []}, "output": str(out)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs on the same data and budget: LoRA r=2 and full fine-tuning."""
    from tiny import save_tiny_model_dir

    root = tmp_path_factory.mktemp("report")
    tiny = save_tiny_model_dir(root / "tiny")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"#### {i + 1}"}]} for i in range(12)]
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = tunelab.train(run_cfg(tiny, data, root / "lora"))
    b = tunelab.train(run_cfg(tiny, data, root / "full", method={"name": "full"}))
    return {"a": a, "b": b, "tiny": tiny, "data": data, "root": root}


def copy_run(src, dst, **config_edits):
    """A run directory with src's records (no weights), config edited by key path."""
    dst.mkdir(parents=True)
    for f in ("config.yaml", "metrics.jsonl", "eval.json"):
        shutil.copy(src / f, dst / f)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    for path, value in config_edits.items():
        section, key = path.split("__")
        cfg[section][key] = value
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def metrics(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


class Page(HTMLParser):
    """Numbers (data-key -> data-value, text, best) and element counts of a generated page."""

    def __init__(self, text):
        super().__init__()
        self.keys, self.tags, self.polylines, self.text, self._open = {}, {}, [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "polyline":  # its <title> (the series name) follows
            self.polylines.append({"points": a["points"].split(), "name": None})
        if "data-key" in a:
            self._open = a["data-key"]
            self.keys[a["data-key"]] = {"value": json.loads(a["data-value"]) if "data-value" in a else None,
                                        "best": "best" in (a.get("class") or "").split(), "text": ""}

    def handle_endtag(self, tag):
        if tag in ("td", "div"):
            self._open = None

    def handle_data(self, data):
        self.text.append(data)
        if self.polylines and self.polylines[-1]["name"] is None:
            self.polylines[-1]["name"] = data
        if self._open:
            self.keys[self._open]["text"] += data

    def value(self, key):
        return self.keys[key]["value"]


# ----------------------------------------------------------------------------- the run report

def test_train_writes_a_report_with_the_run_numbers(runs):
    run = runs["a"]
    page = Page((run / "report.html").read_text())
    res = json.loads((run / "eval.json").read_text())
    for m in ("accuracy", "eval_loss"):
        assert page.value(f"{m}_before") == res["before"][m] and page.value(f"{m}_after") == res["after"][m]
        assert page.value(f"{m}_change") == pytest.approx(res["after"][m] - res["before"][m], abs=1e-12)
    setup, train = metrics(run, "setup")[0], metrics(run, "train")
    assert page.value("trainable_params") == setup["trainable_params"]
    assert page.keys["steps"]["text"] == "3" and page.keys["method"]["text"] == "lora"
    assert page.value("tokens_per_s") == statistics.median(r["tokens_per_s"] for r in train)
    assert page.value("optimizer_state_bytes") == train[-1]["optimizer_state_bytes"]
    loss_curve = next(p["points"] for p in page.polylines if p["name"] == "train loss")
    assert len(loss_curve) == len(train) == 3
    # eval loss points: before (step 0), the eval during training (step 2), after (step 3)
    assert len(metrics(run, "eval")) == 1 and page.tags["circle"] == 3
    assert "No diagnostics were run" in "".join(page.text)


def fake_diagnostics(run):
    d = run / "diagnostics"
    d.mkdir(exist_ok=True)
    files = {
        "forgetting": {"summary": {"kl_drift": 0.125, "retained_accuracy": 0.75, "conjugate_tuned_accuracy": 0.5},
                       "details": {"kl_per_prompt": {"values": [0.1, 0.2, 0.05, 0.15]},
                                   "probes": {"columns": ["question", "tuned_correct"], "rows": [["Capital?", True]]},
                                   "seconds": 1.5}},
        "tuco": {"summary": {"tuco_eval_median": 0.31},
                 "details": {"eval": {"values": [0.2 + 0.01 * i for i in range(25)]},
                             "eval_per_layer": {"columns": ["layer", "ftc_norm", "ptc_norm"],
                                                "rows": [[0, 0.5, 2.0], [1, 0.25, 1.5], [2, 0.75, 1.0]]}}},
        "intruder": {"summary": {}, "details": {"not_applicable": "method 'x' cannot merge"}},
    }
    for name, body in files.items():
        (d / f"{name}.json").write_text(json.dumps({"name": name, "version": 1, "config": {"k": 1}, **body}))
    (d / "knowledge.json").write_text("{not json")
    return files


def test_report_renders_diagnostics_generically(runs, tmp_path):
    run = copy_run(runs["a"], tmp_path / "r")
    files = fake_diagnostics(run)
    page = Page(write_report(run).read_text())
    text = "".join(page.text)
    for name in ("forgetting", "tuco"):
        for k, v in files[name]["summary"].items():
            assert page.value(f"{name}.{k}") == v
    assert "not applicable: method 'x' cannot merge" in text
    assert "knowledge: unreadable (" in text  # a broken file is named, the rest still renders
    html = (run / "report.html").read_text()
    # the per-layer table draws one bar per layer for each numeric column; histograms count all values
    assert html.count("ftc_norm per layer</title>") == 1 and html.count('<rect x=') >= 6
    counts = [int(t.rsplit(": ", 1)[1]) for t in _rect_titles(html) if t.startswith("[")]
    assert sum(counts) == 25 + 4  # TuCo values + KL values, each in its histogram
    assert "Tuning contribution per prompt" in text


def _rect_titles(html):
    import re
    return re.findall(r"<rect [^>]*><title>([^<]*)</title>", html)


def test_missing_diagnostics_name_the_command(runs, tmp_path):
    run = copy_run(runs["a"], tmp_path / "r")
    (run / "diagnostics").mkdir()
    (run / "diagnostics" / "tuco.json").write_text(json.dumps({"name": "tuco", "summary": {"x": 1}, "details": {}}))
    text = "".join(Page(write_report(run).read_text()).text)
    from tunelab.diagnostics import DIAGNOSTICS
    for name in set(DIAGNOSTICS.names()) - {"tuco"}:
        assert f"{name}: not run. Run it with tunelab diagnose {run} --only {name}" in text


def test_report_of_a_run_with_no_evaluation_yet(runs, tmp_path):
    run = copy_run(runs["a"], tmp_path / "r")
    (run / "eval.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + '\n{"step": 3, "kind": "tr')  # cut by a crash
    from tunelab.cli import main
    assert main(["report", str(run)]) == 0 and main(["report", str(tmp_path / "nope")]) == 2
    page = Page((run / "report.html").read_text())
    assert "no evaluation yet" in "".join(page.text) and page.keys["steps"]["text"] == "2 / 3"


# ----------------------------------------------------------------------------- compare

def test_compare_two_runs(runs, tmp_path, capsys):
    from tunelab.cli import main

    a, b = runs["a"], runs["b"]
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    js = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert [r["name"] for r in js["runs"]] == ["lora", "full"]
    rows = {(r["section"], r["figure"]): r for r in js["rows"]}
    for i, run in enumerate((a, b)):
        res = json.loads((run / "eval.json").read_text())
        assert rows["target", "eval_loss_after"]["values"][i] == res["after"]["eval_loss"]
        assert rows["throughput", "optimizer_state_bytes"]["values"][i] == metrics(run, "train")[-1][
            "optimizer_state_bytes"]
    loss = rows["target", "eval_loss_after"]["values"]
    assert rows["target", "eval_loss_after"]["best"] == [loss.index(min(loss))]
    page = Page((tmp_path / "cmp/compare.html").read_text())
    for i, name in enumerate(("lora", "full")):
        cell = page.keys[f"target.eval_loss_after.{name}"]
        assert cell["value"] == loss[i] and cell["best"] == (loss[i] == min(loss))
    assert len(page.polylines) == 2  # both loss curves in one chart
    line = next(ln for ln in out.splitlines() if ln.startswith("target.eval_loss_after"))
    assert svg.fmt_num(loss[0]) in line and svg.fmt_num(loss[1]) in line and "lora" in out and "full" in out


def test_compare_markdown_and_gain_vs_side_effect_charts(runs, tmp_path):
    a, b = copy_run(runs["a"], tmp_path / "a"), copy_run(runs["b"], tmp_path / "b")
    for run, kl in ((a, 0.25), (b, 0.0625)):
        fake_diagnostics(run)
        f = run / "diagnostics/forgetting.json"
        f.write_text(f.read_text().replace('"kl_drift": 0.125', f'"kl_drift": {kl}'))
    c, html, _, md = compare([a, b], tmp_path / "cmp")
    rows = {(r["section"], r["figure"]): r for r in c.rows()}
    lines = md.read_text().splitlines()
    kl_line = next(ln for ln in lines if ln.startswith("| forgetting | kl_drift ↓ |"))
    assert kl_line.split("|")[3:5] == [" 0.25 ", " **0.0625** "]  # the lower drift is the best, in bold
    for (section, fig), r in rows.items():  # every figure of the comparison is a Markdown row
        assert any(ln.startswith(f"| {section} | {fig}") for ln in lines)
    gain = rows["target", "accuracy_change"]["values"]
    titles = re.findall(r"<circle [^>]*><title>([^<]*)</title>", html.read_text())
    assert f"a: KL drift from base 0.25, accuracy change {svg.fmt_num(gain[0])}" in titles
    assert f"b: KL drift from base 0.0625, accuracy change {svg.fmt_num(gain[1])}" in titles
    assert "accuracy_change vs forgetting.retained_accuracy" in html.read_text()
    assert "intruder.intruders_total" not in html.read_text()  # no intruder figures: no chart


def test_compare_refuses_mismatched_budgets(runs, tmp_path, capsys):
    from tunelab.cli import main

    other = copy_run(runs["b"], tmp_path / "other", train__steps=7, train__seed=3)
    with pytest.raises(ConfigError) as e:
        compare([runs["a"], other], tmp_path / "cmp")
    assert "train.steps = 7" in str(e.value) and "train.seed = 3" in str(e.value)
    assert main(["compare", str(runs["a"]), str(other), "--out", str(tmp_path / "cmp")]) == 2
    assert "--allow-mismatch" in capsys.readouterr().err
    c, html, js, _ = compare([runs["a"], other], tmp_path / "cmp", allow_mismatch=True)
    assert len(c.warnings) == 2 and json.loads(js.read_text())["warnings"] == c.warnings
    assert html.read_text().count('class="warn"') == 2 and "warning: allowed mismatch" in text_table(c)


def test_compare_trains_recipes_with_the_reference_budget(runs, tmp_path):
    recipe = tmp_path / "small-lora.yaml"
    cfg = run_cfg(runs["tiny"], runs["data"], tmp_path / "ignored", method={"name": "lora", "r": 3},
                  steps=2, seed=9, micro_batch_size=2)
    cfg["data"]["max_length"] = 48
    recipe.write_text(yaml.safe_dump(cfg))
    c, _, _, _ = compare([runs["a"], recipe], tmp_path / "cmp", overrides=["train.lr=0.001"])
    trained = tmp_path / "cmp/runs/small-lora"
    assert c.runs[1].dir == trained and (trained / "final").is_dir()
    got, ref = (yaml.safe_load((r / "config.yaml").read_text()) for r in (trained, runs["a"]))
    for key in FORCED:
        s, k = key.split(".")
        assert got[s][k] == ref[s][k], key
    assert got["method"]["r"] == 3 and got["train"]["lr"] == 0.001  # the recipe's own choices stay


# ----------------------------------------------------------------------------- in a real browser

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("TUNELAB_REQUIRE_BROWSER"),
                                   reason="headless Chromium not installed (apt-get install chromium; "
                                          ".ci/run installs it)")


def render_in_browser(page, tmp_path, width=1000, height=900):
    """(console lines, screenshot PNG bytes, DOM after load) of a local page in headless Chromium.
    Chromium writes every console message and uncaught exception of the page to its log as
    `...:CONSOLE:<line>] "<message>", source: ...`."""
    assert CHROMIUM, "chromium is required here (TUNELAB_REQUIRE_BROWSER is set) but not installed"
    shot = tmp_path / f"{page.stem}.png"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                           f"--window-size={width},{height}", "--hide-scrollbars", f"--screenshot={shot}",
                           "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    return console, shot.read_bytes(), proc.stdout


def png_pixels(data):
    """(height, width, channels) uint8 array of an 8-bit RGB/RGBA PNG: IDAT inflated, rows unfiltered
    (None/Sub/Up vectorised; Average/Paeth depend on the pixel to the left, so they loop)."""
    import numpy as np

    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", data[pos + 8:pos + 18])
        elif kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    assert depth == 8 and color in (2, 6), (depth, color)
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w * bpp + 1)
    out, prev = np.zeros((h, w * bpp), np.uint8), np.zeros(w * bpp, np.uint8)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:]
        if f in (0, 1, 2):
            cur = line.reshape(w, bpp).cumsum(0, dtype=np.uint8).ravel() if f == 1 else line + prev * (f == 2)
        else:
            cur = np.frombuffer(bytes(_unfilter_left(f, bytearray(line.tobytes()), prev.tobytes(), bpp)), np.uint8)
        out[y] = prev = cur
    return out.reshape(h, w, bpp)


def _unfilter_left(f, cur, up, bpp):
    """PNG Average (3) or Paeth (4) filter of one row, undone in place; pa, pb, pc are the distances
    |p - a|, |p - b|, |p - c| of the Paeth predictor p = a + b - c, written without p."""
    for i in range(len(cur)):
        a, b, c = (cur[i - bpp], up[i], up[i - bpp]) if i >= bpp else (0, up[i], 0)
        if f == 3:
            cur[i] = (cur[i] + ((a + b) >> 1)) & 255
            continue
        pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - c - c)
        cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return cur


def assert_not_blank(png, width, height):
    """The right size, many colours, and neither empty nor all ink."""
    import numpy as np

    img = png_pixels(png)[..., :3]
    assert img.shape[:2] == (height, width)
    colours, counts = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
    ink = 1 - counts.max() / counts.sum()  # share of pixels not in the background colour
    assert len(colours) >= 16 and 0.02 < ink < 0.9, (len(colours), ink)


@needs_browser
def test_console_errors_are_caught(tmp_path):
    """The checks below are not vacuous: a page that logs an error and throws is caught, and the
    PNG decoder reads the colours the page painted where it painted them."""
    bad = tmp_path / "bad.html"
    bad.write_text('<body style="margin:0;background:#fff"><div style="width:100px;height:50px;'
                   'background:rgb(200,30,60)"></div><script>console.error("boom"); undefinedFunction();</script>')
    console, png, dom = render_in_browser(bad, tmp_path, 300, 200)
    assert any("boom" in ln for ln in console) and any("Uncaught" in ln for ln in console)
    img = png_pixels(png)
    assert img.shape[:2] == (200, 300) and "undefinedFunction" in dom
    assert tuple(img[25, 50, :3]) == (200, 30, 60) and tuple(img[120, 200, :3]) == (255, 255, 255)
    with pytest.raises(AssertionError):
        assert_not_blank(png, 300, 200)  # one block of colour is not a page


@needs_browser
def test_pages_render_in_headless_chromium(runs, tmp_path):
    run = copy_run(runs["a"], tmp_path / "r")
    fake_diagnostics(run)
    _, html, _, _ = compare([run, runs["b"]], tmp_path / "cmp")
    for page, needles in ((write_report(run), ["Target task", "Loss", "Throughput", "Side effects", "kl_drift"]),
                          (html, ["Side by side", "eval_loss_after", "kl_drift", "Loss curves"])):
        console, png, dom = render_in_browser(page, tmp_path)
        assert console == [], console
        assert_not_blank(png, 1000, 900)
        text = Page(dom)
        assert all(n in "".join(text.text) for n in needles) and text.tags["svg"] >= 3
        assert "<script" not in page.read_text() and "http" not in page.read_text().replace(
            'xmlns="http://www.w3.org/2000/svg"', "")  # self-contained: no scripts, no network

