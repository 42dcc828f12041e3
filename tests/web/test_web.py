"""The web page (issue #25) in a real browser: headless Chromium driven over the W3C WebDriver
protocol (chromedriver), with the standard library only. Run by tests/web/run.sh, which starts
the server and chromedriver and passes their addresses in the environment:

  LORAMUX_URL        the server (http://127.0.0.1:PORT)
  LORAMUX_KEY        a tenant's API key; LORAMUX_ADMIN_KEY the admin key
  LORAMUX_MODELS     the base model and two adapters, comma-separated
  LORAMUX_LOAD_PATH  an adapter directory the admin may load at run time
  WEBDRIVER_URL      chromedriver (http://127.0.0.1:PORT); CHROMIUM the browser binary
  SCREENSHOTS        where to write web-compare.png and web-server.png

Checks: the page loads and asks for a key; a wrong key shows the server's error; with the right
key it lists exactly the base and the two adapters; a comparison of the three streams three
different answers at once; the server view shows the adapters and a request count that moves;
with the admin key, unload and load buttons work.
"""

import base64
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


class Browser:
    """A WebDriver session: just the commands this test needs."""

    def __init__(self, webdriver_url, chromium, profile):
        self.base = webdriver_url.rstrip("/")
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,860", "--user-data-dir=" + profile]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": chromium, "args": args}}}}
        self.session = "/session/" + self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"WebDriver {method} {path}: {e.read().decode(errors='replace')[:500]}") from None

    def cmd(self, method, path, body=None):
        return self._call(method, self.session + path, body)

    def open(self, url):
        self.cmd("POST", "/url", {"url": url})

    def find(self, css):
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css):
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css, text):
        el = self.find(css)
        self.cmd("POST", f"/element/{el}/clear", {})
        self.cmd("POST", f"/element/{el}/value", {"text": text})

    def js(self, script, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.cmd("GET", "/screenshot")))

    def quit(self):
        try:
            self._call("DELETE", self.session)
        except Exception:
            pass


def wait(what, fn, timeout=60.0):
    """Polls fn until it returns something truthy; fails naming `what`."""
    t = time.time()
    last = None
    while time.time() - t < timeout:
        try:
            last = fn()
            if last:
                return last
        except RuntimeError as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def api(url, key, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer " + key})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def background_load(url, key, models, stop):
    """Requests on `models`, two at a time, until `stop` is set: a server view with traffic."""
    def loop(i):
        while not stop.is_set():
            try:
                api(url + "/v1/completions", key, {"model": models[i % len(models)], "prompt": "Once upon a time", "max_tokens": 24})
            except Exception:
                pass
            i += 1
    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    return threads


def card(b, name):
    return b.js(f"const c = document.querySelector('#card-{name} .value'); return c ? c.textContent : null")


def main():
    url, key, admin = os.environ["LORAMUX_URL"], os.environ["LORAMUX_KEY"], os.environ["LORAMUX_ADMIN_KEY"]
    models = os.environ["LORAMUX_MODELS"].split(",")
    shots = os.environ["SCREENSHOTS"]
    os.makedirs(shots, exist_ok=True)
    b = Browser(os.environ["WEBDRIVER_URL"], os.environ["CHROMIUM"], tempfile.mkdtemp(prefix="loramux-web-profile-"))
    try:
        # The page loads, and asks for a key: the server needs one.
        b.open(url + "/")
        assert b.js("return document.title") == "loramux"
        wait("the key prompt", lambda: b.js("return !document.getElementById('key-form').hidden"))
        print("ok: page loads and asks for an API key")

        # A wrong key: the server's own message.
        b.type("#key-input", "not-the-key")
        b.click("#key-submit")
        err = wait("the wrong key's error", lambda: b.js("return document.getElementById('key-error').textContent"))
        assert "Incorrect API key" in err, err
        assert not b.js("return document.querySelectorAll('#models input').length")
        print(f"ok: wrong key shows {err!r}")

        # The right key: exactly the models it may use, from /v1/models.
        b.type("#key-input", key)
        b.click("#key-submit")
        listed = wait("the model list", lambda: b.js(
            "return document.getElementById('key-form').hidden && [...document.querySelectorAll('#models input')].map(i => i.value)"))
        assert listed[0] == models[0] and sorted(listed[1:]) == sorted(models[1:]), f"listed {listed}, expected {models}"
        assert b.js("return sessionStorage.getItem('loramux.apiKey')") == key
        print(f"ok: right key lists {listed}")

        # Compare the three, same seed: three streams at once, three different answers.
        b.js("document.querySelectorAll('#models input').forEach(i => { i.checked = true; })")
        b.type("#seed", "7")
        b.type("#max_tokens", "64")
        b.click("#run")
        wait("three finished columns", lambda: b.js(
            "const c = document.querySelectorAll('#columns .column'); return c.length === 3 && [...c].every(x => x.matches('.done, .failed'))"),
            timeout=180)
        cols = b.js("""return [...document.querySelectorAll('#columns .column')].map(c => ({
            model: c.dataset.model, failed: c.classList.contains('failed'), chunks: Number(c.dataset.chunks),
            text: c.querySelector('.output').textContent, meta: c.querySelector('.meta').textContent,
            stats: c.querySelector('.stats').textContent }))""")
        for c in cols:
            print(f"   {c['model']} [{c['meta']}] {c['stats'].strip()}: {c['text'][:70]!r}")
            assert not c["failed"], c
            assert c["text"].strip(), c
            assert c["chunks"] > 1, f"{c['model']} came in one piece, not streamed: {c}"
            assert "TTFT" in c["stats"] and "ms" in c["stats"] and "tok/s" in c["stats"] and "– tok/s" not in c["stats"], c
        assert [c["model"] for c in cols] == listed
        assert "rank" in cols[1]["meta"] and "rank" in cols[2]["meta"], cols
        texts = [c["text"] for c in cols]
        assert len(set(texts)) == 3, f"the answers are not all different: {texts}"
        b.screenshot(os.path.join(shots, "web-compare.png"))
        print("ok: three models streamed three different answers")

        # The server view: the adapters, and a request count that moves.
        b.click("#tab-server")
        rows = wait("the adapter rows", lambda: b.js(
            "return [...document.querySelectorAll('#adapters tbody tr')].map(r => r.dataset.adapter)"))
        assert sorted(rows) == sorted(models[1:]), rows
        # The three answers are counted (the view refreshes every 2 s), on each adapter too.
        before = wait("3 requests served", lambda: int(card(b, "requests") or 0) >= 3 and int(card(b, "requests")), timeout=15)
        wait("a request on each adapter", lambda: b.js(
            "return [...document.querySelectorAll('#adapters tbody tr')].every(r => Number(r.children[5].textContent) >= 1)"), timeout=15)
        api(url + "/v1/completions", key, {"model": models[0], "prompt": "Hello", "max_tokens": 4})
        after = int(wait("the request count to move", lambda: int(card(b, "requests")) > before and card(b, "requests"), timeout=15))
        print(f"ok: server view shows adapters {rows}; requests served {before} -> {after}")
        # Some traffic for a few refreshes, so the rate charts have a line to show.
        stop = threading.Event()
        load = background_load(url, key, [listed[0], listed[2]], stop)
        time.sleep(6)

        # The admin key: the same view with unload and load.
        b.click("#change-key")
        b.type("#key-input", admin)
        b.click("#key-submit")
        wait("the unload buttons", lambda: b.js(
            "return !document.getElementById('load-form').hidden && document.querySelectorAll('#adapters button.unload').length === 2"))
        b.screenshot(os.path.join(shots, "web-server.png"))
        stop.set()
        for t in load:
            t.join()
        gone = models[2]
        b.click(f"#adapters tr[data-adapter='{gone}'] button.unload")
        wait(f"{gone} to be unloaded", lambda: b.js(f"return !document.querySelector(\"#adapters tr[data-adapter='{gone}']\")"))
        b.type("#load-name", gone)
        b.type("#load-path", os.environ["LORAMUX_LOAD_PATH"])
        b.click("#load-form button[type=submit]")
        wait(f"{gone} to be loaded again", lambda: b.js(f"return !!document.querySelector(\"#adapters tr[data-adapter='{gone}']\")"))
        print(f"ok: admin key unloads and loads {gone}")

        print(f"screenshots: {shots}/web-compare.png, {shots}/web-server.png")
    except BaseException:
        try:  # what the page showed, for the log
            b.screenshot(os.path.join(shots, "failure.png"))
            print("page text at the failure:\n" + b.js("return document.body.innerText"), file=sys.stderr)
            print(f"screenshot: {shots}/failure.png", file=sys.stderr)
        except Exception:
            pass
        raise
    finally:
        b.quit()


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        sys.exit(1)
