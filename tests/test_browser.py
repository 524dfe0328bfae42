"""End to end in a real headless Chromium (Debian's, driven by playwright): type a message, watch the
reply stream in with its footer, then find every view with data: the counter table, the live cache
map, the load/compute timeline and the heatmap on the Stats tab, a what-if replay, the settings; and
watch the Stats tab refresh while a reply streams.

The same code refreshes the README's screenshots (one per tab):

    python tests/test_browser.py assets/screenshots
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python tests/test_browser.py` from the checkout

from servers import free_port  # noqa: E402

import app  # noqa: E402
from webapp.service import EMBEDDED_MODEL  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}
PROMPT = "To be, or not to be"
TIMEOUT_MS = 30_000
SCREENSHOTS = ("chat", "stats", "whatif", "settings")  # one per tab: README's pictures

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


def chat_then_tabs(context, url: str, out_dir: Path, prompt: str = PROMPT) -> dict:
    """Send `prompt` in the Chat tab, wait for the whole reply, then open Stats, What-if (replay the
    session) and Settings. Saves chat.png, stats.png, whatif.png and settings.png in `out_dir`;
    returns what the page showed."""
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
    for plot in ("#expert-heatmap", "#cache-map"):
        page.locator(f"{plot} g.hm image").first.wait_for(state="attached", timeout=TIMEOUT_MS)
    page.locator("#timeline g.trace.bars path").first.wait_for(state="attached", timeout=TIMEOUT_MS)
    for name, plot in (("heatmap", "#expert-heatmap"), ("cache_map", "#cache-map"), ("timeline", "#timeline")):
        shown[f"{name}_title"] = page.locator(f"{plot} .gtitle").text_content()
    shown["timeline_bars"] = page.locator("#timeline g.trace.bars path").count()
    shown["cache_map_legend"] = page.locator("#cache-map .legend").text_content()
    shown["counters"] = page.locator("#counters").inner_text()
    page.screenshot(path=str(out_dir / "stats.png"), full_page=True)

    page.get_by_role("tab", name="What-if").click()
    page.locator("#whatif-run").click()
    page.locator("#whatif-notes").get_by_text("Predicted on").wait_for(timeout=TIMEOUT_MS)
    shown["whatif"] = page.locator("#whatif-table").inner_text()
    page.screenshot(path=str(out_dir / "whatif.png"), full_page=True)

    page.get_by_role("tab", name="Settings").click()
    settings = page.locator("#settings-tab")
    settings.get_by_text("Running engine").wait_for(timeout=TIMEOUT_MS)
    shown["settings"] = settings.inner_text()
    page.screenshot(path=str(out_dir / "settings.png"), full_page=True)
    page.close()
    return shown


STATS_TEXT = """() => {
  const map = document.querySelector('#cache-map .gtitle'), table = document.querySelector('#counters');
  return (map ? map.textContent : '') + ' | ' + (table ? table.innerText : '');
}"""


def tokens_generated(text: str) -> int | None:
    found = re.search(r"tokens generated\s+(\d+) tokens", text)
    return int(found.group(1)) if found else None


def watch_stats_while_streaming(context, url: str, attempts: int = 5) -> list[list[int]]:
    """Send long replies (240 tokens at temperature 2) from the Chat tab while the Stats tab is open;
    per reply, the counter table's "tokens generated" each time the Stats tab changed, from before
    the reply to its final refresh. Stops after the first reply that showed a value in between
    (a sampled reply can end early: up to `attempts` replies)."""
    page = context.new_page()
    page.goto(url)
    box = page.locator("#message textarea")
    box.wait_for(timeout=TIMEOUT_MS)
    page.evaluate(f"""() => {{
      window.statsStates = [];
      const text = {STATS_TEXT};
      new MutationObserver(() => {{
        const now = text();
        if (window.statsStates[window.statsStates.length - 1] !== now) window.statsStates.push(now);
      }}).observe(document.body, {{subtree: true, childList: true, characterData: true}});
    }}""")
    page.get_by_text("System prompt and sampling").click()
    for slider, value in (("#max-new-tokens", "240"), ("#temperature", "2")):
        number = page.locator(f"{slider} input[type=number]")
        number.fill(value)
        number.press("Enter")
    page.wait_for_timeout(500)  # the sliders' new values reach the app's state before the message goes
    finished = "|".join(app.FINISH_REASONS.values())
    replies = []
    for attempt in range(attempts):
        page.get_by_role("tab", name="Chat").click()
        page.evaluate("window.statsStates = []")
        box.fill(PROMPT)
        box.press("Enter")
        page.get_by_role("tab", name="Stats").click()
        page.wait_for_function(
            f"() => document.querySelectorAll('#chatbot .reply-footer').length > {attempt} && "
            f"/{finished}/.test([...document.querySelectorAll('#chatbot .reply-footer')].pop().innerText)",
            timeout=3 * TIMEOUT_MS)
        page.wait_for_timeout(3000)  # the refresh after the reply
        counts = [n for n in map(tokens_generated, page.evaluate("window.statsStates")) if n is not None]
        replies.append(list(dict.fromkeys(counts)))
        if len(replies[-1]) >= 3:
            break
    page.close()
    return replies


def open_chromium(playwright, profile_dir: str):
    return playwright.chromium.launch_persistent_context(
        profile_dir, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT)


def serve(store_dir: Path, max_new_tokens: int, offload: str = "ram"):
    port = free_port()
    demo = app.main(["--port", str(port), "--store-dir", str(store_dir), "--max-new-tokens", str(max_new_tokens),
                     "--offload", offload], block=False)
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


def test_chat_streams_a_reply_and_every_view_renders_with_data(served, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = open_chromium(playwright, str(tmp_path / "profile"))
        try:
            shown = chat_then_tabs(context, served, tmp_path)
        finally:
            context.close()
    assert "tokens/s" in shown["footer"] and "cache hit rate" in shown["footer"]
    updates = [state for state in shown["states"] if "tokens/s" in state]
    assert len(updates) >= 2, f"the reply did not stream: {shown['states']}"
    assert shown["heatmap_title"].startswith("Expert selections")
    assert shown["cache_map_title"].startswith("Live cache map") and "on the device" in shown["cache_map_legend"]
    assert shown["timeline_title"].startswith("Load/compute timeline") and shown["timeline_bars"] > 4
    assert "cache hit rate" in shown["counters"] and "tokens/s" in shown["counters"]
    assert "cache hit rate" in shown["whatif"] and "tokens/s" in shown["whatif"]
    assert "Apply" in shown["settings"] and "layers × experts" in shown["settings"]
    assert all((tmp_path / f"{name}.png").stat().st_size > 0 for name in SCREENSHOTS)


def test_the_stats_tab_updates_while_a_reply_streams(served, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = open_chromium(playwright, str(tmp_path / "profile"))
        try:
            replies = watch_stats_while_streaming(context, served)
        finally:
            context.close()
    # before the reply, at least one refresh while it streamed, and its final count
    assert any(len(counts) >= 3 and counts == sorted(counts) for counts in replies), replies


def write_readme_screenshots(out_dir: Path, max_new_tokens: int = 40) -> list[Path]:
    """One screenshot per tab (chat, settings, stats, whatif) after one reply of the embedded model
    (disk tier, so the cache map shows experts on disk), scaled to 2/3."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo, url = serve(tmp / "store", max_new_tokens, offload="disk")
        try:
            with sync_playwright() as playwright:
                context = open_chromium(playwright, str(tmp / "profile"))
                try:
                    chat_then_tabs(context, url, tmp)
                finally:
                    context.close()
        finally:
            demo.close()
        paths = []
        for name in SCREENSHOTS:
            image = Image.open(tmp / f"{name}.png").convert("RGB")
            image = image.resize((image.width * 2 // 3, image.height * 2 // 3), Image.LANCZOS)
            image.save(out_dir / f"{name}.png", optimize=True)
            paths.append(out_dir / f"{name}.png")
    return paths


if __name__ == "__main__":
    print(*write_readme_screenshots(Path(sys.argv[1] if len(sys.argv) > 1 else "assets/screenshots")), sep="\n")
