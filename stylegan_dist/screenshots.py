"""``python -m stylegan_dist.screenshots``: PNG screenshots of a training run (and a sweep) in MLflow's own UI.

Starts ``mlflow ui`` on a tracking store (or uses a running server, --url), opens it in headless Chromium
(Debian's ``chromium``) driven through the DevTools protocol, and writes:

  runs.png              the experiment's run list (model-training view)
  charts.png            one run's metric charts (loss/, progress/, speed/, metrics/ sections)
  images-last.png       the run's sample grids (a time-stepped image) at the last logged step
  images-first.png      ... and at the first step
  system.png            the run's system metrics
  model.png             the registered generator's versions in the Model Registry
  sweep-compare.png     a sweep's trials side by side (parallel coordinates, metrics), with --sweep-experiment

Each page is checked before it is captured: it must show the run's name (or the model's), and a page with
charts must hold at least one rendered chart; a page that does not is an error naming it. The DOM text of
every page is written beside the PNGs (``<name>.txt``) for tests and for reading without a browser.

Examples:
  python -m stylegan_dist.screenshots --tracking-uri sqlite:///runs/mlflow.db --run demo --out docs/images/mlflow
  python -m stylegan_dist.screenshots --tracking-uri sqlite:///runs/mlflow.db --run demo \\
      --sweep-experiment smoke --out docs/images/mlflow
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import fail

ML_VIEW = "workflowType=machine_learning"  # MLflow 3's model-training side bar (the GenAI one is the default)
CHART_JS = "document.querySelectorAll('.js-plotly-plot, canvas, svg.recharts-surface, svg.main-svg').length"


class ScreenshotError(RuntimeError):
    """One sentence: what could not be shown."""


# --------------------------------------------------------------------------------------------------
# A minimal DevTools-protocol client (aiohttp comes with ray[default])


class Browser:
    def __init__(self, chromium: str, width: int, height: int):
        self.chromium, self.width, self.height = chromium, width, height
        self.proc: subprocess.Popen | None = None
        self.profile = tempfile.mkdtemp(prefix="sgd-chromium-")
        self._ws = self._session = None
        self._id = 0

    async def start(self) -> None:
        import aiohttp

        self.proc = subprocess.Popen(
            [self.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-dev-shm-usage", f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.time() > deadline:
                raise ScreenshotError(f"Chromium ({self.chromium}) did not start a DevTools endpoint.")
            await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            pages = [t for t in json.loads(resp.read()) if t.get("type") == "page"]
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Page.enable")
        await self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                        deviceScaleFactor=1, mobile=False)

    async def call(self, method: str, **params: Any) -> dict:
        self._id += 1
        my_id = self._id
        await self._ws.send_str(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = await asyncio.wait_for(self._ws.receive(), timeout=120)
            if msg.type.name != "TEXT":
                raise ScreenshotError(f"Chromium closed the DevTools connection during {method}.")
            data = json.loads(msg.data)
            if data.get("id") == my_id:
                if "error" in data:
                    raise ScreenshotError(f"Chromium refused {method}: {data['error'].get('message')}.")
                return data.get("result", {})

    async def js(self, expression: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return r.get("result", {}).get("value")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def text(self) -> str:
        return await self.js("document.body ? document.body.innerText : ''") or ""

    async def wait_for(self, what: str, expression: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while not await self.js(expression):
            if time.time() > deadline:
                raise ScreenshotError(f"The MLflow UI did not show {what} within {timeout:.0f} s.")
            await asyncio.sleep(0.5)

    async def key(self, key: str, code: str, key_code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code,
                            nativeVirtualKeyCode=key_code)

    async def screenshot(self, path: Path) -> None:
        r = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(r["data"]))

    async def close(self) -> None:
        try:
            if self._ws is not None:
                await self._ws.close()
            if self._session is not None:
                await self._session.close()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            shutil.rmtree(self.profile, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The MLflow UI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowUI:
    """``mlflow ui`` on a tracking store, on a free local port, until closed."""

    def __init__(self, tracking_uri: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
        if mlflow_bin is None:
            raise ScreenshotError("The mlflow command is not installed in this environment.")
        self.log = tempfile.NamedTemporaryFile(prefix="sgd-mlflow-ui-", suffix=".log", delete=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        self.proc = subprocess.Popen([mlflow_bin, "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
                                      "--port", str(self.port), "--workers", "1"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                tail = Path(self.log.name).read_text()[-400:].strip().splitlines()
                self.close()
                raise ScreenshotError(f"mlflow ui on {tracking_uri} did not come up"
                                      + (f" ({tail[-1]})" if tail else "") + ".")
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        os.unlink(self.log.name)


@dataclass
class Page:
    name: str
    route: str  # after "#/"
    expect: list[str]  # texts the page must show
    charts: int = 0  # at least this many rendered charts
    metrics: list[str] = field(default_factory=list)  # compare page: the metrics its plots show
    texts: dict[str, str] = field(default_factory=dict)


@dataclass
class Target:
    """The run (and model, sweep) the screenshots show, found through the tracking store."""
    experiment_id: str
    run_id: str
    run_name: str
    image_steps: list[int]
    model: tuple[str, str] | None  # (name, version)
    sweep: tuple[str, list[str], list[str]] | None = None  # (experiment id, trial run ids, evaluated metrics)


def find_target(tracking_uri: str, experiment: str, run_name: str | None, sweep_experiment: str | None) -> Target:
    from mlflow.tracking import MlflowClient

    from .tracking import image_steps

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ScreenshotError(f"No MLflow experiment named '{experiment}' in {tracking_uri}.")
    flt = f"attributes.run_name = '{run_name}'" if run_name else ""
    runs = client.search_runs([exp.experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                              max_results=20)
    runs = [r for r in runs if r.data.tags.get("sweep.role") != "parent"]
    if not runs:
        raise ScreenshotError(f"Experiment '{experiment}' has no run" + (f" named '{run_name}'." if run_name else "."))
    run = runs[0]
    steps = image_steps(client, run.info.run_id, "samples")
    model = None
    uri = run.data.tags.get("model.uri", "")
    if uri.startswith("models:/"):
        name, version = uri[len("models:/"):].split("/", 1)
        model = (name, version)
    sweep = None
    if sweep_experiment:
        sexp = client.get_experiment_by_name(sweep_experiment)
        if sexp is None:
            raise ScreenshotError(f"No MLflow experiment named '{sweep_experiment}' in {tracking_uri}.")
        runs = [r for r in client.search_runs([sexp.experiment_id]) if r.data.tags.get("sweep.role") == "trial"]
        trials = [r.info.run_id for r in runs]
        evaluated = sorted({k for r in runs for k in r.data.metrics if k.startswith("metrics/")})
        if len(trials) < 2:
            raise ScreenshotError(f"Sweep experiment '{sweep_experiment}' has {len(trials)} trial run(s); the "
                                  f"comparison needs two.")
        sweep = (sexp.experiment_id, trials, evaluated[:3])
    return Target(exp.experiment_id, run.info.run_id, run.info.run_name, steps, model, sweep)


def pages_for(t: Target) -> list[Page]:
    run = f"experiments/{t.experiment_id}/runs/{t.run_id}"
    pages = [
        Page("runs", f"experiments/{t.experiment_id}/runs?{ML_VIEW}", [t.run_name]),
        Page("charts", f"{run}/model-metrics?{ML_VIEW}", [t.run_name, "loss"], charts=1),
        Page("system", f"{run}/system-metrics?{ML_VIEW}", [t.run_name, "system/"], charts=1),
    ]
    if t.model is not None:
        name, version = t.model
        pages.append(Page("model", f"models/{urllib.parse.quote(name)}?{ML_VIEW}", [name, f"Version {version}"]))
    if t.sweep is not None:
        exp_id, trials, metrics = t.sweep
        q = urllib.parse.urlencode({"runs": json.dumps(trials), "experiments": json.dumps([exp_id])})
        pages.append(Page("sweep-compare", f"compare-runs?{q}&{ML_VIEW}", ["Parallel Coordinates Plot"], charts=1,
                          metrics=metrics))
    return pages


_FOCUS_METRICS = """(() => { const box = [...document.querySelectorAll('input[role=combobox]')]
    .filter(i => i.getBoundingClientRect().width > 0)[1]; if (!box) return false; box.focus(); box.click();
    return true; })()"""  # the second select of the compare page: Metrics
_CLOSE_ASSISTANT = """(() => { const b = [...document.querySelectorAll('button[aria-label=Close]')]
    .filter(b => b.getBoundingClientRect().left > window.innerWidth * 0.6); b.forEach(x => x.click());
    return b.length; })()"""


async def _capture(browser: Browser, base: str, page: Page, out: Path, settle: float, timeout: float) -> str:
    await browser.goto(f"{base}/#/{page.route}")
    expect = json.dumps(page.expect)
    await browser.wait_for(f"{', '.join(page.expect)} on the {page.name} page",
                           f"(() => {{ const t = document.body ? document.body.innerText : '';"
                           f" return {expect}.every(s => t.includes(s)); }})()", timeout)
    if await browser.js(_CLOSE_ASSISTANT):  # the assistant side panel opens on the first visit: more room
        await asyncio.sleep(1)
    if page.charts:
        await browser.wait_for(f"a chart on the {page.name} page", f"{CHART_JS} >= {page.charts}", timeout)
    if page.metrics:  # the compare page picks some metric; show the evaluated ones instead
        if not await browser.js(_FOCUS_METRICS):
            raise ScreenshotError(f"The {page.name} page has no Metrics box to choose {page.metrics[0]} in.")
        for _ in range(8):  # Backspace in an empty multi-select removes its last choice
            await browser.key("Backspace", "Backspace", 8)
        for name in page.metrics:
            await browser.js(_FOCUS_METRICS)
            await browser.call("Input.insertText", text=name)
            await asyncio.sleep(1)
            await browser.key("Enter", "Enter", 13)
            await asyncio.sleep(1)
        await browser.key("Escape", "Escape", 27)
        await browser.wait_for(f"{page.metrics[0]} in the {page.name} plot",
                               f"document.body.innerText.includes({json.dumps(page.metrics[0])})", timeout)
    await asyncio.sleep(settle)  # charts animate in
    await browser.screenshot(out / f"{page.name}.png")
    text = await browser.text()
    (out / f"{page.name}.txt").write_text(text)
    return text


_LAST_LABEL = """(() => {{ const els = [...document.querySelectorAll('*')].filter(e => e.children.length == 0 &&
    e.textContent.trim() == {label}); if (!els.length) return false;
    els[els.length - 1].scrollIntoView({{block: 'start'}}); return true; }})()"""
_OPEN_CARD = """(() => { const s = document.querySelector('[role=slider]'); if (!s) return false;
    let card = s; while (card && card.querySelectorAll('button').length < 2) card = card.parentElement;
    if (!card) return false; card.querySelectorAll('button')[0].click(); return true; })()"""
_TRACK = """(() => { let e = document.querySelector('[role=dialog] [role=slider]'); if (!e) return null;
    while (e.parentElement && e.getBoundingClientRect().width < 300) e = e.parentElement;
    const r = e.getBoundingClientRect(); return JSON.stringify([r.left, r.top, r.width, r.height]); })()"""
_STEP = "(() => { const s = document.querySelector('[role=dialog] [role=slider]'); " \
        "return s ? Number(s.getAttribute('aria-valuenow')) : null; })()"
_IMAGE_SHOWN = "[...document.querySelectorAll('[role=dialog] img')].some(i => i.complete && i.naturalWidth > 0 && " \
               "i.src.includes('step%2B{step}%2B'))"


async def _image_panel(browser: Browser, base: str, t: Target, out: Path, settle: float, timeout: float
                       ) -> list[str]:
    """The sample-grid image card of the run's model-metrics page (key ``samples``, in MLflow's "Model metrics"
    section), opened full size, at the last logged step and then at the first (its step slider clicked at the
    ends of its track)."""
    if len(t.image_steps) < 2:
        raise ScreenshotError(f"Run {t.run_name} has {len(t.image_steps)} logged sample grid(s); the image panel "
                              f"screenshots need two steps.")
    await browser.goto(f"{base}/#/experiments/{t.experiment_id}/runs/{t.run_id}/model-metrics?{ML_VIEW}")
    # the cards are drawn when scrolled into view; the image card sits in the section of keys without a group
    await browser.wait_for("the run's chart sections", _LAST_LABEL.format(label=json.dumps("Model metrics")), timeout)
    await asyncio.sleep(2 * settle)  # the sections below re-render as they come into view
    await browser.wait_for("the sample-grid image card", _OPEN_CARD, timeout)
    await browser.wait_for("the enlarged image card", _TRACK, timeout)
    await asyncio.sleep(settle)
    written = []
    for name, end, step in (("images-last", 1, t.image_steps[-1]), ("images-first", 0, t.image_steps[0])):
        shown = f"{_STEP} === {step} && " + _IMAGE_SHOWN.format(step=step)
        deadline = time.time() + timeout
        while True:  # the dialog opens with an animation: click again until the slider has moved
            track = await browser.js(_TRACK)
            if track is None:
                raise ScreenshotError("The enlarged sample-grid card closed before its step could be chosen.")
            left, top, width, height = json.loads(track)
            x = left + width - 2 if end else left + 2
            for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
                await browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=top + height / 2, button="left",
                                   clickCount=1)
            try:
                await browser.wait_for(f"the sample grid at step {step}", shown, min(10.0, timeout))
                break
            except ScreenshotError:
                if time.time() > deadline:
                    raise
        await asyncio.sleep(settle)
        await browser.js("(() => { const i = [...document.querySelectorAll('[role=dialog] img')].pop(); "
                         "i.scrollIntoView({block: 'center'}); return true; })()")  # below the run's params
        await asyncio.sleep(1)
        await browser.screenshot(out / f"{name}.png")
        (out / f"{name}.txt").write_text(await browser.text())
        written.append(name)
    return written


async def _run(args: argparse.Namespace, t: Target, base: str, out: Path) -> list[Path]:
    browser = Browser(args.chromium, args.width, args.height)
    written = []
    try:
        await browser.start()
        for page in pages_for(t):
            await _capture(browser, base, page, out, args.settle, args.timeout)
            written.append(out / f"{page.name}.png")
            print(f"  {page.name}.png")
        for name in await _image_panel(browser, base, t, out, args.settle, args.timeout):
            written.append(out / f"{name}.png")
            print(f"  {name}.png")
    finally:
        await browser.close()
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stylegan_dist.screenshots", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tracking-uri", metavar="URI", help="tracking store to start `mlflow ui` on "
                     "(sqlite:///runs/mlflow.db, postgresql://...)")
    src.add_argument("--url", metavar="URL", help="a running MLflow server or UI to use instead (no credentials)")
    ap.add_argument("--experiment", default="stylegan_dist", help="experiment of the run (default: stylegan_dist)")
    ap.add_argument("--run", metavar="NAME", help="run name (default: the experiment's newest run)")
    ap.add_argument("--sweep-experiment", metavar="NAME", help="also screenshot this sweep's trials compared")
    ap.add_argument("--out", default="docs/images/mlflow", metavar="DIR", help="where the PNGs go (default: "
                    "docs/images/mlflow)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium",
                    help="the Chromium binary (default: chromium on PATH; Debian: apt-get install chromium)")
    ap.add_argument("--width", type=int, default=1600, help="window width in pixels (default: 1600)")
    ap.add_argument("--height", type=int, default=1000, help="window height in pixels (default: 1000)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to let a page settle before the capture "
                    "(default: 2)")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds a page may take to show what it must "
                    "(default: 90)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .tracking import absolute_uri

    ui = None
    try:
        if not (Path(args.chromium).is_file() or shutil.which(args.chromium)):
            raise ScreenshotError(f"Chromium was not found ({args.chromium}); install it (Debian: apt-get install "
                                  f"chromium) or pass --chromium PATH.")
        uri = absolute_uri(args.tracking_uri) if args.tracking_uri else args.url.rstrip("/")
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            raise ScreenshotError(f"The tracking store {uri} does not exist.")
        t = find_target(uri, args.experiment, args.run, args.sweep_experiment)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.tracking_uri:
            print(f"Starting mlflow ui on {uri} ...")
            ui = MlflowUI(uri)
        base = ui.url if ui else uri
        print(f"Screenshots of run {t.run_name} ({t.run_id}) from {base} into {out}:")
        t0 = time.time()
        written = asyncio.run(_run(args, t, base, out))
        print(f"Wrote {len(written)} screenshots in {time.time() - t0:.0f} s.")
    except ScreenshotError as e:
        return fail(str(e))
    finally:
        if ui is not None:
            ui.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
