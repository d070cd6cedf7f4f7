"""A headless Chromium driven through the DevTools protocol, for the web page's test and its screenshot.

Debian's `chromium` is started with --remote-debugging-port=0 (it picks a free port and writes it to
DevToolsActivePort in the profile), and one page is driven over the browser's WebSocket with a flat session
(Target.attachToTarget flatten=True): real navigation, real file input, real mouse clicks, the page's own fetch.
The `websockets` package's synchronous client carries the messages; nothing else is needed.

As a script it takes the README's screenshot of a running server's page answering a clip:
    python tests/browser.py --url http://127.0.0.1:8000/ --clip tests/fixtures/commonvoice/clips/X.mp3 \
        --instruction "Answer in one sentence." --out docs/web-page.png
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

# Waits for the page's #answer to leave the "streaming" state; resolves with the final state.
_FINISHED = """new Promise((resolve) => {
  const a = document.getElementById("answer");
  const check = () => (a.dataset.state !== "streaming" && a.dataset.state !== "idle") ? (resolve(a.dataset.state), true)
                                                                                       : false;
  if (!check()) new MutationObserver((m, obs) => { if (check()) obs.disconnect(); })
    .observe(a, { attributes: true, attributeFilter: ["data-state"] });
})"""


def chromium_binary() -> str | None:
    """Debian's chromium (or $CHROMIUM), None when there is none."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(RuntimeError):
    """The browser failed to start, a protocol call failed, or the page threw."""


class Chromium:
    """One headless Chromium with one page; `call` sends a DevTools command to the page and returns its result."""

    def __init__(self, binary: str | None = None, width: int = 900, height: int = 900, timeout: float = 60.0):
        binary = binary or chromium_binary()
        if not binary:
            raise BrowserError("no chromium binary (apt-get install chromium, or set $CHROMIUM)")
        self.timeout = timeout
        self.profile = Path(tempfile.mkdtemp(prefix="diva-chromium-"))
        self.log = open(self.profile / "chromium.log", "wb")  # noqa: SIM115 (closed in close())
        args = [binary, "--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-sync", "--mute-audio",
                "--disable-dev-shm-usage",  # containers (CI) often give /dev/shm only 64 MiB
                "--hide-scrollbars", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run its sandbox as root (CI's containers)
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        try:
            self._stack = contextlib.ExitStack()
            self.ws = self._stack.enter_context(connect(self._browser_url(), max_size=None, proxy=None,
                                                        open_timeout=timeout))
            target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "DOM"):
                self.call(f"{domain}.enable")
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    def _browser_url(self) -> str:
        """ws://127.0.0.1:<port>/devtools/browser/<id>, from the DevToolsActivePort file Chromium writes."""
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            lines = port_file.read_text().split() if port_file.exists() else []
            if len(lines) == 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.05)
        raise BrowserError(f"chromium did not open its DevTools port in {self.timeout:.0f} s")

    def log_text(self) -> str:
        self.log.flush()
        return (self.profile / "chromium.log").read_text(errors="replace")

    # --- the protocol ----------------------------------------------------------------------------------

    def _send(self, method: str, params: dict | None = None, session: str | None = None,
              timeout: float | None = None) -> dict:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._receive(deadline, f"{method}: no answer in {timeout or self.timeout:.0f} s")
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def call(self, method: str, params: dict | None = None, timeout: float | None = None) -> dict:
        """A DevTools command to the page; its result."""
        return self._send(method, params, self.session, timeout)

    def evaluate(self, expression: str, timeout: float | None = None) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited); raises what the page threw."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, timeout)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]!r} threw: "
                               f"{details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        """The first event `method` received (already or within `timeout`)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, event in enumerate(self.events):
                if event["method"] == method:
                    return self.events.pop(i)
            msg = self._receive(deadline, f"no {method} event in {timeout or self.timeout:.0f} s")
            if "method" in msg:
                self.events.append(msg)

    def _receive(self, deadline: float, late: str) -> dict:
        """The next message from the browser before `deadline` (time.monotonic); BrowserError(late) after it."""
        while (left := deadline - time.monotonic()) > 0:
            try:
                return json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                continue
        raise BrowserError(late)

    def page_errors(self) -> list[str]:
        """Uncaught exceptions and console.error messages the page produced so far."""
        errors = []
        for event in self.events:
            if event["method"] == "Runtime.exceptionThrown":
                details = event["params"]["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif event["method"] == "Runtime.consoleAPICalled" and event["params"]["type"] == "error":
                errors.append(" ".join(str(a.get("value", a.get("description"))) for a in event["params"]["args"]))
        return errors

    # --- what a user does ------------------------------------------------------------------------------

    def open(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self.events.clear()
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")
        self.wait_event("Page.loadEventFired")

    def _node(self, selector: str) -> int:
        root = self.call("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        if not node:
            raise BrowserError(f"no element {selector!r} on the page")
        return node

    def choose_file(self, selector: str, path: str | os.PathLike[str]) -> None:
        """Put a file into an <input type=file>, as the file picker does (fires input and change)."""
        self.call("DOM.setFileInputFiles", {"nodeId": self._node(selector), "files": [str(Path(path).resolve())]})

    def type_text(self, selector: str, text: str) -> None:
        """Focus a field and type into it with key events."""
        self.call("DOM.focus", {"nodeId": self._node(selector)})
        self.call("Input.insertText", {"text": text})

    def click(self, selector: str) -> None:
        """A left click at the element's centre (it is scrolled into view first)."""
        node = self._node(selector)
        self.call("DOM.scrollIntoViewIfNeeded", {"nodeId": node})
        quad = self.call("DOM.getContentQuads", {"nodeId": node})["quads"][0]
        x, y = sum(quad[0::2]) / 4, sum(quad[1::2]) / 4
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def wait_until(self, expression: str, timeout: float | None = None) -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{expression!r} still false after {timeout or self.timeout:.0f} s")
            time.sleep(0.05)

    def wait_answer(self, timeout: float | None = None) -> str:
        """Wait until the page's answer is finished; its final state ("done", "error" or "stopped")."""
        return self.evaluate(_FINISHED, timeout)

    def screenshot(self, path: str | os.PathLike[str]) -> Path:
        """A PNG of the whole page (the viewport stretched to the content's height)."""
        metrics = self.call("Page.getLayoutMetrics")
        width = metrics["cssLayoutViewport"]["clientWidth"]
        height = int(metrics["cssContentSize"]["height"]) + 1
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        out = Path(path)
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                self._send("Browser.close", timeout=5)
            except Exception:  # already gone: fall through to terminate
                pass
            self._stack.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ask_on_page(browser: Chromium, url: str, clip: str | os.PathLike[str], instruction: str | None = None,
                settings: dict[str, Any] | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Open the page, upload `clip`, type the instruction, fill the generation settings (`settings`: field id ->
    value, e.g. {"max-tokens": 32, "temperature": 0.8, "seed": 7}), press Ask, wait for the end of the answer.

    Returns the final state, the answer text, the text of each appended chunk (the page appends one text node
    per streamed delta), the error shown (if any) and the page's uncaught errors."""
    browser.open(url)
    browser.choose_file("#file", clip)
    browser.wait_until("!document.getElementById('ask').disabled")
    if instruction:
        browser.type_text("#instruction", instruction)
    for field, value in (settings or {}).items():
        browser.evaluate(f"document.getElementById({json.dumps(field)}).value = {json.dumps(str(value))}")
    browser.click("#ask")
    browser.wait_until("document.getElementById('answer').dataset.state !== 'idle'")
    state = browser.wait_answer(timeout)
    page = browser.evaluate("""(() => {
      const a = document.getElementById("answer"), e = document.getElementById("error");
      return { text: a.textContent, chunks: Array.from(a.childNodes, (n) => n.textContent),
               error: e.hidden ? null : e.textContent, status: document.getElementById("answer-status").textContent };
    })()""")
    return {"state": state, **page, "page_errors": browser.page_errors()}


def main() -> int:
    p = argparse.ArgumentParser(description="Screenshot the web page after it answered a clip.")
    p.add_argument("--url", required=True, help="the page, e.g. http://127.0.0.1:8000/")
    p.add_argument("--clip", required=True, help="audio file to upload")
    p.add_argument("--instruction", default=None)
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--width", type=int, default=900)
    args = p.parse_args()
    with Chromium(width=args.width) as browser:
        result = ask_on_page(browser, args.url, args.clip, args.instruction)
        browser.evaluate("document.activeElement && document.activeElement.blur()")
        browser.screenshot(args.out)
    print(json.dumps({k: result[k] for k in ("state", "text", "error", "status")}, indent=1))
    return 0 if result["state"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
