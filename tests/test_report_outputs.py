"""What a reader gets: every LaTeX table kind compiles with a real TeX engine and shows its headers in order; the
HTML report renders in a real headless Chromium with no errors, every figure loaded, and the same tables as the
Markdown report."""
import html.parser
import json
import re
import subprocess

import pytest

from system_tools import debian_tool
from upbench import report
from upbench.results import ResultStore, config_hash
from upbench.schema import build_row

pytestmark = pytest.mark.slow


def _run(task, up, ds, metrics, backbone="dinov2_s14", data=None, params=10, seed=0):
    cfg = {"task": {"name": task}, "upsampler": {"name": up, "weights": None}, "backbone": {"name": backbone},
           "dataset": {"name": ds, "img_size": 448}, "seed": seed}
    return build_row(cfg, config_hash(cfg), "ok", metrics=metrics, timing={"upsampler_ms": 12.5},
                     data=data or {}, params={"upsampler": params}, device={"type": "cpu"})


def _scaling_rows():
    out = []
    for up, fam, k in (("bilinear", "interpolation", 0.1), ("uplift", "local", 1.0), ("jafar", "cross-attention", 2)):
        for n in (196, 784, 3136):
            status = "oom" if (up == "jafar" and n == 3136) else "ok"
            ms = k * n / 100 if status == "ok" else None
            cfg = {"task": "scaling", "upsampler": {"name": up}, "backbone": {"name": "dinov3_splus16"}, "size": n,
                   "device": {"type": "cpu", "name": "cpu"}, "dtype": "float32", "cpu_threads": 2,
                   "memory_limit_gb": 8.0, "seed": 0}
            out.append(build_row(cfg, config_hash(cfg), status, data={"tokens": n, "size": int(n ** .5) * 16,
                                                                       "family": fam, "gflops": 1.0},
                                 timing={"median_ms": ms, "iqr_ms": 0.01 * ms if ms else None, "runs": 3,
                                         "times_ms": [ms, ms, ms] if ms else []},
                                 memory={"peak_mb": n / 10 if ms else None, "limit_gb": 8.0},
                                 params={"upsampler": 1000}))
    return out


def table_kinds():
    seg = [_run("seg", up, d, {"miou": 40.0 + i, "acc": 80.0 - i}) for d in ("voc", "ade20k")
           for i, up in enumerate(("bilinear", "jafar", "uplift"))]
    depth = [_run("depth", up, "coco_depth", {"d1": 50.0 + i, "rmse": 0.7 - i / 10}) for i, up in
             enumerate(("bilinear", "uplift"))]
    gen = [_run("generative", up, d, {"ssim": 0.5 + i / 10, "psnr": 20.0 + i, "fid": 100.0 - i, "pfid": 150.0 - i},
                backbone="sd15_vae") for d in ("faceshq", "lhq") for i, up in enumerate(("bilinear", "uplift_vae"))]
    t2i = [_run("t2i_upscale", up, "coco_captions", {"fid": 25.0 - i, "pfid": 30.0, "clip": 31.0, "fid_base": 26.0,
                                                      "pfid_base": 31.0, "clip_base": 30.0}, backbone="sd15_vae",
                data={"base_size": 512, "out_size": 1024}) for i, up in enumerate(("bilinear", "uplift_vae"))]
    # the group header row (datasets) comes first, then the row of column names
    return {"seg": (seg, ["VOC", "ADE20K", "Upsampler", "Params", "Time", "mIoU", "Acc", "Weights"]),
            "depth": (depth, ["COCO depth", "Upsampler", "RMSE", "Weights"]),
            "generative": (gen, ["FacesHQ", "LHQ", "SSIM", "PSNR", "FID", "p-FID"]),
            "t2i": (t2i, ["COCO-5k", "FID", "p-FID", "CLIP", "no upscaling"]),
            "scaling": (_scaling_rows(), ["Tokens (px)", "bilinear", "jafar", "uplift", "Time slope", "Max tokens"])}


DOCUMENT = r"""\documentclass{article}
\usepackage[T1]{fontenc}
\usepackage{booktabs,graphicx}
\begin{document}
%s
\end{document}
"""


@pytest.mark.parametrize("kind", ["seg", "depth", "generative", "t2i", "scaling"])
def test_every_latex_table_kind_compiles_and_shows_its_headers_in_order(tmp_path, kind):
    pdflatex = debian_tool("pdflatex", "texlive-latex-base texlive-latex-recommended", "compiling the LaTeX tables")
    pdftotext = debian_tool("pdftotext", "poppler-utils", "reading the compiled tables")
    rows, headers = table_kinds()[kind]
    tex = report.render(rows, "latex", paper=kind == "seg", scaling=kind == "scaling")
    (tmp_path / "t.tex").write_text(DOCUMENT % tex)
    out = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    log = (tmp_path / "t.log").read_text(errors="replace")
    overfull = [float(m) for m in re.findall(r"Overfull \\hbox \((\d+\.\d+)pt too wide\)", log)]
    assert not [w for w in overfull if w > 1.0], f"tables wider than the page: {overfull}"
    text = subprocess.run([pdftotext, "-layout", "t.pdf", "-"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=60).stdout
    positions = [text.find(h) for h in headers]
    assert all(p >= 0 for p in positions), (headers, text[:1500])
    assert positions == sorted(positions), (headers, positions)


class _Tables(html.parser.HTMLParser):
    """Titles (h3) and expanded header texts of every table in a page, and the page's image attributes."""

    def __init__(self):
        super().__init__()
        self.titles, self.headers, self._rows, self._cell, self._tag = [], [], [], None, None
        self.images_ok = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._tag = tag
        if tag == "thead":
            self._rows = []
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag == "th" and self._rows:
            self._cell = [int(a.get("colspan", 1)), int(a.get("rowspan", 1)), ""]
            self._rows[-1].append(self._cell)
        elif tag == "body" and "data-images" in a:
            self.images_ok = json.loads(a["data-images"])

    def handle_endtag(self, tag):
        if tag == "th":
            self._cell = None
        elif tag == "thead":
            self.headers.append(self._expand(self._rows))
            self._rows = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data
        elif self._tag == "h3":
            self.titles.append(data)
            self._tag = None

    @staticmethod
    def _expand(rows):
        if len(rows) == 1:
            return [c[2] for c in rows[0]]
        first, groups = rows[0][0][2], [g for c in rows[0][1:] for g in [c[2]] * c[0]]
        return [first] + [f"{g} {n[2]}".strip() for g, n in zip(groups, rows[1])]


def test_the_html_report_renders_in_chromium_like_the_markdown_report(tmp_path):
    chromium = debian_tool("chromium", "chromium", "rendering the HTML report")
    from upbench.report.html import write_report

    store = ResultStore(str(tmp_path / "results"))
    seg, _ = table_kinds()["seg"]
    for i, r in enumerate(seg):
        r["metrics"]["per_class_iou"] = [10.0 * (i + 1), None, 55.0]
        r["data"].update(class_names=["a", "b", "c"], val_pixels_per_class=[5, 0, 9])
    for r in seg + _scaling_rows():
        store.write(r)
    page = write_report(str(tmp_path / "results"), str(tmp_path / "out"))
    text = page.read_text()
    assert text.count("<img ") >= 2 and "data:image/png;base64," in text
    # a copy that records what the browser saw: images' natural widths and any script error
    probe = text.replace("</body>", "<script>window.addEventListener('load', () => document.body.setAttribute("
                         "'data-images', JSON.stringify([...document.images].map(i => i.naturalWidth))));"
                         "</script></body>")
    (tmp_path / "probe.html").write_text(probe)
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", f"file://{tmp_path / 'probe.html'}"], capture_output=True,
                         text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    seen = _Tables()
    seen.feed(dom.stdout)
    assert seen.images_ok and all(w > 0 for w in seen.images_ok), seen.images_ok
    rows = store.rows()
    tables = report.all_tables(rows)
    md = report.to_markdown(tables)
    md_titles = [line[4:] for line in md.splitlines() if line.startswith("### ")]
    md_headers = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
                  if line.startswith("| Upsampler |") or line.startswith("| Tokens (px) |")]
    assert seen.titles == md_titles and len(seen.headers) == len(tables) == len(md_headers)
    assert seen.headers == md_headers
    shot = tmp_path / "page.png"
    snap = subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1280,2400",
                           f"file://{page}"], capture_output=True, text=True, timeout=180)
    assert snap.returncode == 0 and shot.stat().st_size > 20_000, snap.stderr[-2000:]
