"""End to end in a real browser: JupyterLab runs the notebook that holds the retrieval explorer,
headless Chromium (driven by playwright) changes the query, and the page must show the new
results.

What it does, on a temporary copy of notebooks/ (with the runs/cache checkpoint cache and
data/ when they exist, so nothing is retrained that the repository already has, and nothing in
the repository is written but the screenshots):
  1. starts `jupyter lab` on 127.0.0.1 with a token and a fresh settings/workspace directory,
  2. opens the notebook, runs every cell (menu Run > Run All Cells), waits until all ran,
  3. reads the explorer's summary (query index, retrieved labels, the results image),
  4. picks another class in the explorer's class dropdown: the query, its class, the labels and
     the image must change, and the labels must agree with their ✓/✗ marks,
  5. types the first query back into the slider's readout: the summary must show the first
     query's labels again,
  6. saves screenshots of the explorer (before / after each change) in runs/screenshots/.

Chromium comes from Debian (/usr/bin/chromium, or $CSD_CHROMIUM); `playwright install` is never
needed. Without Chromium or playwright the test skips, except under CI (CI=true), where it
fails: .ci/run installs both.

The notebook: $CSD_BROWSER_NOTEBOOK (a file name in notebooks/), else the first of PREFERRED that
builds a RetrievalExplorer (02: about 35 s on 2 cores when it trains its three first tasks, less
when the notebooks ran first and filled the cache; 06 needs every method for 3 seeds, minutes from
an empty cache), else any notebook that builds one,
else a two-cell notebook written into the copy (explorer on digits pixels and an untrained net).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SHOTS = ROOT / "runs" / "screenshots"
CHROMIUM = os.environ.get("CSD_CHROMIUM", "/usr/bin/chromium")
# the first of these that builds an explorer wins (see the module docstring)
PREFERRED = ["08_compatibility.ipynb", "02_first_task.ipynb", "06_comparison.ipynb"]
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

SERVER_START_S = 90  # jupyter lab answering /api/status
PAGE_LOAD_S = 90  # JupyterLab's page, the notebook and its kernel ready
RUN_ALL_S = 180  # every cell of the notebook executed
UPDATE_S = 30  # the explorer's kernel round trip after a change in the page


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _need_browser() -> None:
    """Skip (locally) or fail (CI) when playwright or Chromium is missing."""
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install playwright)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium, or set CSD_CHROMIUM)")
    if missing:
        msg = "the browser test needs " + " and ".join(missing)
        if _in_ci():
            pytest.fail(msg + "; CI=true, and .ci/run installs both, so this is a CI setup error")
        pytest.skip(msg)


# ------------------------------------------------------------------------------------------------
# the working copy


def _code(nb: dict) -> str:
    return "\n".join("".join(c.get("source", "")) for c in nb["cells"] if c["cell_type"] == "code")


def explorer_notebook(folder: Path) -> Path | None:
    """The notebook to drive: $CSD_BROWSER_NOTEBOOK, else the first of PREFERRED, else any, that
    builds a RetrievalExplorer."""
    if os.environ.get("CSD_BROWSER_NOTEBOOK"):
        path = folder / os.environ["CSD_BROWSER_NOTEBOOK"]
        assert path.is_file(), f"CSD_BROWSER_NOTEBOOK: no notebook {path}"
        return path
    found = [p for p in sorted(folder.glob("*.ipynb"))
             if "RetrievalExplorer(" in _code(json.loads(p.read_text()))]
    found.sort(key=lambda p: PREFERRED.index(p.name) if p.name in PREFERRED else len(PREFERRED))
    return found[0] if found else None


FALLBACK_CELLS = [
    # used only while no notebook of the repository builds an explorer
    "import torch\n"
    "from csdkit.models import resnet\n"
    "from csdkit.train import prepare, preset\n"
    "from csdkit.widgets import RetrievalExplorer\n\n"
    "torch.set_num_threads(1)\n"
    "torch.manual_seed(0)\n"
    "data, split = prepare(preset('quick').replace(data_root='../data'))",
    "explorer = RetrievalExplorer(\n"
    "    {'raw pixels': data.test.images.flatten(1).float(),\n"
    "     'untrained': resnet(8, split.increments[0])},\n"
    "    data.test.images, data.test.labels, data.mean, data.std, data.class_names, k=5)\n"
    "explorer.widget",
]


def _fallback_notebook(path: Path) -> None:
    cells = [{"cell_type": "code", "execution_count": None, "id": f"cell-{i}", "metadata": {},
              "outputs": [], "source": src} for i, src in enumerate(FALLBACK_CELLS)]
    nb = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                      "language": "python"}}}
    path.write_text(json.dumps(nb, indent=1))


def _strip(path: Path) -> int:
    """Clear outputs and the saved widget state, so that whatever the page shows was made by this
    run (saved widget state would render a stale explorer before the kernel ran a cell). Returns
    how many code cells JupyterLab will execute (it skips blank ones)."""
    nb = json.loads(path.read_text())
    nb["metadata"].pop("widgets", None)
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            c["outputs"], c["execution_count"] = [], None
    path.write_text(json.dumps(nb, indent=1))
    return sum(1 for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip())


@pytest.fixture
def need_browser():
    _need_browser()


@pytest.fixture
def workdir(need_browser, tmp_path):
    """A copy of the repository's layout: notebooks/, benchmarks/results/, the run cache
    runs/cache/ and data/ when they exist, and a link to the csdkit package (the notebooks find
    the repository root by it)."""
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__")
    shutil.copytree(NOTEBOOKS, repo / "notebooks", ignore=ignore)
    if (ROOT / "runs" / "cache").is_dir():
        shutil.copytree(ROOT / "runs" / "cache", repo / "runs" / "cache", ignore=ignore)
    if (ROOT / "data").is_dir():
        shutil.copytree(ROOT / "data", repo / "data", ignore=ignore)
    # notebook 08 reads a stored benchmark result (the tuning of its methods)
    shutil.copytree(ROOT / "benchmarks" / "results", repo / "benchmarks" / "results")
    (repo / "csdkit").symlink_to(ROOT / "csdkit", target_is_directory=True)
    return repo


# ------------------------------------------------------------------------------------------------
# the server and the browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (localhost only)
        return r.status


class Lab:
    def __init__(self, url: str, token: str, log: Path):
        self.url, self.token, self.log = url, token, log

    def log_tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])


@pytest.fixture
def lab(workdir, tmp_path):
    """`jupyter lab` serving the working copy; shut down (kernels included) even on failure."""
    port, token = _free_port(), uuid.uuid4().hex
    settings = tmp_path / "lab-settings"
    for plugin, values in {
        # no news/update toast over the notebook, no request to the outside
        "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        # every cell in the DOM, always (the default virtualises cells out of view)
        "notebook-extension/tracker": {"windowingMode": "none"},
    }.items():
        f = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))
    env = {**os.environ, "CI": "true", "PYTHONUNBUFFERED": "1",
           "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime")}
    log = tmp_path / "jupyter-lab.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--IdentityProvider.token={token}",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--ServerApp.root_dir={workdir}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly"]  # no PyPI queries
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
        cmd.append("--allow-root")
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = Lab(url, token, log)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if _get(f"{url}/api/status?token={token}") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer in {SERVER_START_S} s:\n"
                            f"{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        _stop(proc, url, token)


def _stop(proc: subprocess.Popen, url: str, token: str) -> None:
    """Ask the server to shut down (it stops its kernels), then SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        try:
            req = urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(req, timeout=5).close()  # noqa: S310 (localhost only)
        except OSError:
            pass
    for sig, wait in [(None, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5)]:
        if sig is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)  # its own session: the group is the server's alone
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def page(lab, tmp_path):
    """A page of headless Chromium with a fresh profile; the browser is closed even on failure."""
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    context = None
    try:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(PAGE_LOAD_S * 1000)
        yield context.pages[0] if context.pages else context.new_page()
    finally:
        try:
            if context is not None:
                context.close()
        finally:
            pw.stop()


# ------------------------------------------------------------------------------------------------
# reading the page

KERNEL_IDLE_JS = """() => {
    const bar = document.querySelector('#jp-main-statusbar');
    return !!bar && /\\|\\s*Idle/.test(bar.textContent);
}"""

PROMPTS_JS = """() => Array.from(document.querySelectorAll(
    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt'),
    e => e.textContent.trim())"""

ERRORS_JS = """() => Array.from(document.querySelectorAll(
    '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'),
    e => e.textContent).filter(t => t.includes('Traceback') || /^\\s*-{20,}/.test(t))"""

STATE_JS = """(box) => {
    const text = s => { const e = box.querySelector(s); return e ? e.textContent.trim() : null; };
    const sel = box.querySelector('.csd-class select');
    const gallery = box.querySelector('.csd-gallery select');
    const summary = box.querySelector('.csd-summary .csd-summary-text');
    const img = box.querySelector('.csd-results img') || box.querySelector('img.csd-results');
    return {
        query: text('.csd-summary .csd-query-index'),
        dataQuery: summary && summary.dataset.query,
        dataClass: summary && summary.dataset.class,
        readout: text('.csd-query .widget-readout'),
        classLabel: sel && sel.selectedIndex >= 0 ? sel.options[sel.selectedIndex].text : null,
        classOptions: sel ? Array.from(sel.options, o => o.text) : [],
        galleryOptions: gallery ? Array.from(gallery.options, o => o.text) : [],
        src: img ? img.getAttribute('src') || '' : null,
        imgWidth: img ? img.naturalWidth : 0,
        rows: Array.from(box.querySelectorAll('.csd-summary tr.csd-row'), r => ({
            model: r.dataset.model,
            labels: r.dataset.labels,
            gallery: r.dataset.gallery,
            labelsText: (r.querySelector('td.csd-labels') || {}).textContent,
            cells: Array.from(r.querySelectorAll('td'), d => d.textContent),
        })),
    };
}"""


def _wait(what: str, check, timeout: float, lab: Lab, poll: float = 0.25):
    """Poll check() until it returns something truthy; fail with the server log after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n"
                        f"--- jupyter lab log ---\n{lab.log_tail()}")
        time.sleep(poll)


def run_all(page, lab: Lab, n_code: int) -> None:
    """Run > Run All Cells, then wait until no cell is queued or running; fail on an error."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
    started = time.monotonic()
    seen_busy = False

    def done():
        nonlocal seen_busy
        prompts = page.evaluate(PROMPTS_JS)
        busy = any("*" in p for p in prompts)
        seen_busy |= busy
        ran = sum(bool(re.fullmatch(r"\[\d+\]:", p)) for p in prompts)
        # finished: every cell ran, or (after a failure) nothing queued any more
        if not busy and (ran >= n_code or (seen_busy or time.monotonic() - started > 20)):
            return prompts
        return None

    prompts = _wait("Run All Cells to finish", done, RUN_ALL_S, lab, poll=0.5)
    errors = page.evaluate(ERRORS_JS)
    if errors:
        pytest.fail("a cell raised:\n" + "\n\n".join(e[-3000:] for e in errors), pytrace=False)
    ran = sum(bool(re.fullmatch(r"\[\d+\]:", p)) for p in prompts)
    if ran != n_code:
        pytest.fail(f"only {ran} of {n_code} code cells ran; prompts: {prompts}", pytrace=False)


def check_consistent(state: dict) -> None:
    """What one summary must say about itself: the query index everywhere, labels in both places,
    a ✓ for exactly the retrieved images of the query's class, a non-empty image."""
    assert state["query"] is not None and state["query"].isdigit(), state
    assert state["query"] == state["dataQuery"] == state["readout"], state
    assert state["src"] and state["src"].startswith(("data:image/png", "blob:")), state["src"]
    assert state["imgWidth"] > 0, "the results image did not load"
    assert state["classLabel"] and state["classLabel"].split(":")[0] == state["dataClass"], state
    assert state["rows"], "the summary lists no model"
    for row in state["rows"]:
        labels = row["labels"].split(",")
        assert row["labelsText"] == row["labels"], row
        assert all(x.isdigit() for x in labels), row
        hits = " ".join(row["cells"])
        expected = sum(x == state["dataClass"] for x in labels)
        assert hits.count("✓") == expected and hits.count("✗") == len(labels) - expected, (
            f"✓/✗ marks disagree with labels {labels} for class {state['dataClass']}: {row}")


def _labels(state: dict) -> list[str]:
    return [row["labels"] for row in state["rows"]]


# ------------------------------------------------------------------------------------------------
# the test


def test_retrieval_explorer_in_jupyterlab(workdir, lab, page):
    t0 = time.monotonic()
    nb = explorer_notebook(workdir / "notebooks")
    if nb is None:  # no notebook builds an explorer yet: a two-cell one on digits does
        nb = workdir / "notebooks" / "browser_explorer.ipynb"
        _fallback_notebook(nb)
    n_code = _strip(nb)
    SHOTS.mkdir(parents=True, exist_ok=True)
    shot = SHOTS / nb.stem
    try:
        page.goto(f"{lab.url}/lab/tree/notebooks/{nb.name}?token={lab.token}")
        page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for()
        # the kernel must be connected before Run All (else Lab asks which kernel to start):
        # the status bar says "Python 3 (ipykernel) | Idle"
        _wait("the notebook's kernel to be idle", lambda: page.evaluate(KERNEL_IDLE_JS),
              PAGE_LOAD_S, lab)
        t_open = time.monotonic()
        run_all(page, lab, n_code)
        t_run = time.monotonic()

        box = page.locator(".csd-explorer").first
        box.wait_for(state="visible", timeout=UPDATE_S * 1000)
        box.scroll_into_view_if_needed()
        n_cells = len(page.evaluate(PROMPTS_JS))

        def state():
            return box.evaluate(STATE_JS)

        before = _wait("the explorer to render its summary and image",
                       lambda: (s := state())["query"] and s["imgWidth"] and s, UPDATE_S, lab)
        check_consistent(before)
        box.screenshot(path=f"{shot}-1-before.png")

        # 1. another class in the class dropdown: the query jumps to that class's first image
        other = next((o for o in before["classOptions"]
                      if o.split(":")[0] != before["dataClass"]), None)
        assert other is not None, f"the class dropdown offers one class only: {before}"
        box.locator(".csd-class select").select_option(label=other)
        after = _wait("the explorer to show the new class's query",
                      lambda: (s := state())["query"] != before["query"]
                      and s["src"] != before["src"] and s["imgWidth"] and s, UPDATE_S, lab)
        check_consistent(after)
        assert after["dataClass"] == other.split(":")[0], (other, after)
        assert _labels(after) != _labels(before), (
            f"another query of another class retrieved the same labels: {before} {after}")
        box.screenshot(path=f"{shot}-2-after-class.png")

        # 2. the first query typed into the slider's readout: its results come back
        readout = box.locator(".csd-query .widget-readout")
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type(before["query"])
        page.keyboard.press("Enter")
        back = _wait(f"the explorer to show query {before['query']} again",
                     lambda: (s := state())["query"] == before["query"]
                     and s["src"] != after["src"] and s["imgWidth"] and s, UPDATE_S, lab)
        check_consistent(back)
        assert back["dataClass"] == before["dataClass"]
        assert _labels(back) == _labels(before), (before, back)
        box.screenshot(path=f"{shot}-3-query-typed.png")

        # 3. the gallery control, where the explorer has one (notebook 08): every shown model's
        # query searches the chosen model's gallery, then each its own again
        if back["galleryOptions"]:
            # the dropdown shows a name's spaces as no-break spaces; data-gallery has plain ones
            label = next(o for o in back["galleryOptions"]
                         if o.replace("\xa0", " ") not in ("own", back["rows"][0]["gallery"]))
            chosen = label.replace("\xa0", " ")

            def searching(gallery_of, before):  # the state once every row searches
                s = state()                      # gallery_of(row) and a new image has loaded
                ok = all(r["gallery"] == gallery_of(r) for r in s["rows"])
                return ok and s["src"] != before["src"] and s["imgWidth"] and s

            box.locator(".csd-gallery select").select_option(label=label)
            moved = _wait(f"every row to search {chosen!r}'s gallery",
                          lambda: searching(lambda r: chosen, back), UPDATE_S, lab)
            check_consistent(moved)
            box.screenshot(path=f"{shot}-4-gallery.png")
            box.locator(".csd-gallery select").select_option(label="own")
            own = _wait("every row to search its own gallery",
                        lambda: searching(lambda r: r["model"], moved), UPDATE_S, lab)
            check_consistent(own)
            assert own["query"] == back["query"], (back, own)
        page.screenshot(path=f"{shot}-page.png")
        # nothing in the page went wrong on the way (a traceback from an observer, say), and
        # the keys typed went to the readout, not to notebook shortcuts (no cell added/changed)
        assert not page.evaluate(ERRORS_JS), page.evaluate(ERRORS_JS)
        assert len(page.evaluate(PROMPTS_JS)) == n_cells, "typing changed the notebook's cells"
    except BaseException:
        try:
            page.screenshot(path=f"{shot}-failure.png", full_page=True)
        except Exception:  # noqa: BLE001 (the page may be gone; the original error matters)
            pass
        print(f"--- jupyter lab log ---\n{lab.log_tail()}")
        raise
    print(f"{nb.name}: opened in {t_open - t0:.1f} s, ran all cells in {t_run - t_open:.1f} s, "
          f"explorer checked in {time.monotonic() - t_run:.1f} s; screenshots in {SHOTS}")
