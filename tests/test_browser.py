"""End to end in a real headless Chromium (Debian's, driven by playwright): type a message, watch the
reply stream in with its footer, open the Stats tab and find the expert heatmap.

The same code refreshes the README's screenshot:

    python tests/test_browser.py assets/screenshot.png
"""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python tests/test_browser.py` from the checkout

import app  # noqa: E402
from webapp.service import EMBEDDED_MODEL  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}
PROMPT = "To be, or not to be"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.browser

# Collects every text the last reply showed, so the test can tell a streamed reply from one that
# appeared at once.
WATCH_REPLY = """() => {
  window.replyStates = [];
  const record = () => {
    const bots = document.querySelectorAll('#chatbot .message.bot, #chatbot [data-testid="bot"]');
    const text = bots.length ? bots[bots.length - 1].innerText.trim() : '';
    if (text && window.replyStates[window.replyStates.length - 1] !== text) window.replyStates.push(text);
  };
  new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_then_stats(context, url: str, out_dir: Path, prompt: str = PROMPT) -> dict:
    """Send `prompt` in the Chat tab, wait for the whole reply, then open the Stats and Settings tabs.
    Saves chat.png, stats.png and settings.png in `out_dir`; returns what the page showed."""
    page = context.new_page()
    page.goto(url)
    box = page.locator("#message textarea")
    box.wait_for(timeout=TIMEOUT_MS)
    page.evaluate(WATCH_REPLY)
    box.fill(prompt)
    box.press("Enter")
    footer = page.locator("#chatbot .reply-footer").last
    finished = "|".join(app.FINISH_REASONS.values())
    page.wait_for_function(
        f"() => [...document.querySelectorAll('#chatbot .reply-footer')].some(e => /{finished}/.test(e.innerText))",
        timeout=TIMEOUT_MS,
    )
    page.wait_for_timeout(500)  # let the stats refresh after the reply land
    shown = {"footer": footer.inner_text(), "states": page.evaluate("window.replyStates")}
    page.screenshot(path=str(out_dir / "chat.png"))
    page.get_by_role("tab", name="Stats").click()
    heatmap = page.locator("#expert-heatmap .js-plotly-plot")
    heatmap.wait_for(timeout=TIMEOUT_MS)
    page.locator("#expert-heatmap g.hm image").first.wait_for(state="attached", timeout=TIMEOUT_MS)
    shown["heatmap_title"] = page.locator("#expert-heatmap .gtitle").text_content()
    shown["counters"] = page.locator("#counters").inner_text()
    page.screenshot(path=str(out_dir / "stats.png"), full_page=True)
    page.get_by_role("tab", name="Settings").click()
    settings = page.locator("#settings-tab")
    settings.get_by_text("Running engine").wait_for(timeout=TIMEOUT_MS)
    shown["settings"] = settings.inner_text()
    settings.screenshot(path=str(out_dir / "settings.png"))
    page.close()
    return shown


def open_chromium(playwright, profile_dir: str):
    return playwright.chromium.launch_persistent_context(
        profile_dir, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT)


def serve(store_dir: Path, max_new_tokens: int):
    port = free_port()
    demo = app.main(["--port", str(port), "--store-dir", str(store_dir), "--max-new-tokens", str(max_new_tokens)],
                    block=False)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip("Debian's Chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
    pytest.importorskip("playwright", reason="the playwright Python package is not installed")
    if not (REPO / EMBEDDED_MODEL / "config.json").exists():
        pytest.skip(f"the embedded model {EMBEDDED_MODEL} is missing (it is trained by tools.train_tiny)")
    demo, url = serve(tmp_path_factory.mktemp("store"), max_new_tokens=24)
    yield url
    demo.close()


def test_chat_streams_a_reply_and_the_stats_tab_shows_the_heatmap(served, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = open_chromium(playwright, str(tmp_path / "profile"))
        try:
            shown = chat_then_stats(context, served, tmp_path)
        finally:
            context.close()
    assert "tokens/s" in shown["footer"] and "cache hit rate" in shown["footer"]
    updates = [state for state in shown["states"] if "tokens/s" in state]
    assert len(updates) >= 2, f"the reply did not stream: {shown['states']}"
    assert shown["heatmap_title"].startswith("Expert selections")
    assert "cache hit rate" in shown["counters"] and "tokens/s" in shown["counters"]
    assert "Apply" in shown["settings"] and "layers × experts" in shown["settings"]
    assert all((tmp_path / f"{name}.png").stat().st_size > 0 for name in ("chat", "stats", "settings"))


def write_readme_screenshot(out: Path, max_new_tokens: int = 40) -> Path:
    """Chat and Settings (left) beside Stats (right), after one reply of the embedded model."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo, url = serve(tmp / "store", max_new_tokens)
        try:
            with sync_playwright() as playwright:
                context = open_chromium(playwright, str(tmp / "profile"))
                try:
                    chat_then_stats(context, url, tmp)
                finally:
                    context.close()
        finally:
            demo.close()
        chat, stats, settings = (Image.open(tmp / f"{name}.png") for name in ("chat", "stats", "settings"))
        height = max(chat.height + settings.height, stats.height)
        sheet = Image.new("RGB", (chat.width + stats.width, height), stats.getpixel((0, 0)))
        sheet.paste(chat, (0, 0))
        sheet.paste(settings, ((chat.width - settings.width) // 2, chat.height))
        sheet.paste(stats, (chat.width, 0))
        sheet = sheet.resize((sheet.width * 2 // 3, height * 2 // 3), Image.LANCZOS)
        sheet.save(out, optimize=True)
    return out


if __name__ == "__main__":
    print(write_readme_screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "assets/screenshot.png")))
