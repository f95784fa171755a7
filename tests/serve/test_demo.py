"""The Gradio demo in headless Chromium: the page loads, generation and multi-turn editing (edit, edit this result
again, undo) show their images and history, all on 127.0.0.1."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
gr = pytest.importorskip("gradio")
pytest.importorskip("fastapi")

from nextstep.assets import builtin_model_dir  # noqa: E402
from nextstep.cli import main as cli_main  # noqa: E402
from nextstep.sampling.chain import KEY, Chain  # noqa: E402
from nextstep.sampling.options import FIELDS  # noqa: E402
from nextstep.sampling.pipeline import EDIT_DEFAULTS, Pipeline, read_defaults  # noqa: E402
from nextstep.serve.demo import build_demo, theme  # noqa: E402
from nextstep.shapes.synth import make_sample  # noqa: E402
from tests.serve.test_api import model_dir  # noqa: E402, F401  (the shared model fixture)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"  # screenshots for CI; gitignored


def _loopback(address) -> bool:
    if not isinstance(address, tuple):  # a unix socket path
        return True
    host = address[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture
def offline(monkeypatch) -> Iterator[list]:
    """Records (and refuses) every connection this process opens beyond loopback."""
    outside = []
    connect = socket.socket.connect

    def guarded(sock, address):
        if not _loopback(address):
            outside.append(address)
            raise OSError(f"test is offline: refused connection to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    yield outside
    assert not outside, f"the demo tried to reach {outside}"


@pytest.fixture
def demo_url(model_dir, offline) -> Iterator[str]:  # noqa: F811
    pipe = Pipeline.from_pretrained(model_dir, device="cpu")
    # The built-in model at its own resolution (a real scene in the screenshot); the tiny reference small.
    builtin = model_dir == builtin_model_dir()
    demo = build_demo(pipe, size=(128, 128) if builtin else (32, 32), steps=8 if builtin else 2)
    _, url, _ = demo.queue().launch(
        server_name="127.0.0.1",
        server_port=_free_port(),
        prevent_thread_lock=True,
        quiet=True,
        share=False,
        ssr_mode=False,
        theme=theme(),
    )
    try:
        yield url
    finally:
        demo.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_demo_generates_and_edits_in_headless_chromium(demo_url, model_dir, tmp_path):  # noqa: F811
    """Generate, send the result to the edit tab; upload a scene, edit it, edit the result again (two turns in the
    history, with their instructions), undo (one)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    outside = []

    def local_only(route):
        url = route.request.url
        if url.startswith(demo_url.rstrip("/")) or url.startswith(("data:", "blob:")):
            return route.continue_()
        outside.append(url)
        return route.abort()

    source = tmp_path / "source.png"
    make_sample(5, seed=0).images[0].save(source)  # a 128x128 scene: "<image_0>remove the white ring"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", local_only)
            page.goto(demo_url, wait_until="load")  # not networkidle: the page keeps a heartbeat open (gr.State)
            page.locator("#t2i-run").wait_for(timeout=60_000)
            assert page.title() == "NextStep"

            page.locator("#t2i-prompt textarea").fill("a red circle")
            page.locator("#t2i-run").click()
            page.locator("#t2i-gallery img").first.wait_for(timeout=60_000)
            # the gallery shows partial images first; the result to edit again exists once the status says Done
            sync_api.expect(page.locator("#t2i-status")).to_have_text("Done", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "demo_generate.png"), full_page=True)

            page.locator("#t2i-edit").click()  # the generated image becomes the edit tab's source
            page.locator("#edit-source img").first.wait_for(timeout=60_000)
            # The checkpoint's own editing defaults (sampling_defaults.json), not the official ones.
            expected = read_defaults(model_dir).get("edit", {}).get("cfg", EDIT_DEFAULTS["cfg"])
            assert float(page.locator("#edit-cfg input[type=number]").input_value()) == expected
            page.locator("#edit-source input[type=file]").set_input_files(str(source))
            page.locator("#edit-instruction textarea").fill("remove the white ring")
            page.locator("#edit-run").click()
            page.locator("#edit-gallery img").first.wait_for(timeout=60_000)
            captions = page.locator("#edit-history .caption-label")
            expect = sync_api.expect
            expect(captions).to_have_text(["1. remove the white ring (seed 0)"], timeout=60_000)
            page.locator("#edit-instruction textarea").fill("make the star yellow")
            page.locator("#edit-again").click()
            expect(captions).to_have_text(
                ["1. remove the white ring (seed 0)", "2. make the star yellow (seed 1)"], timeout=60_000
            )
            page.screenshot(path=str(ARTIFACTS / "demo_edit.png"), full_page=True)
            page.locator("#edit-undo").click()
            expect(captions).to_have_text(["1. remove the white ring (seed 0)"], timeout=60_000)
        finally:
            browser.close()
    assert not outside, f"the page tried to load {outside}"
    assert Image.open(ARTIFACTS / "demo_generate.png").size[0] > 0


def test_demo_reports_a_missing_model(capsys):
    assert cli_main(["demo", "--model", "/nonexistent/model"]) == 2
    assert capsys.readouterr().err.startswith("nextstep: error: model directory not found")


def _handler(demo, name: str):
    return next(f.fn for f in demo.fns.values() if f.name == name)


def test_edit_this_result_continues_the_chain_and_undo_drops_a_turn(model_dir):  # noqa: F811
    """The handlers behind the buttons: a generated image sent to the edit tab, edited twice with seed 3, gives
    pipe.edit_chain's two turns after the generation (turns 0, 1, 2; seeds 3, 4); undo goes back to turn 1."""
    pipe = Pipeline.from_pretrained(model_dir, device="cpu")
    demo = build_demo(pipe, model="shapes")
    *_, (images, status, generated, selected) = _handler(demo, "generate")("a red circle", 32, 32, 0, 3.0, 2, 1)
    assert status == "Done" and generated is images and selected == 0  # the last update holds the result
    _, _, turns, _, _ = _handler(demo, "send_to_edit")(images, 0)
    for instruction in ("make it blue", "add a star"):
        _, turns, shown = _handler(demo, "edit_again")(turns, instruction, 3, 3.0, 1.5, 2)
    chain = pipe.edit_chain(images[0], ["make it blue", "add a star"], seed=3, steps=2, cfg=3.0, cfg_img=1.5)
    for got, want in zip(turns[1:], chain, strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    record = Chain.from_json(turns[-1].info[KEY])
    assert [(t.command, t.turn, t.seed, t.model) for t in record.turns] == [
        ("generate", 0, 0, "shapes"),
        ("edit", 1, 3, "shapes"),
        ("edit", 2, 4, "shapes"),
    ]
    assert [caption for _, caption in shown] == ["1. make it blue (seed 3)", "2. add a star (seed 4)"]
    latest, turns, shown = _handler(demo, "undo")(turns)
    assert len(turns) == 2 and latest == turns[-1:] and [c for _, c in shown] == ["1. make it blue (seed 3)"]
    with pytest.raises(gr.Error, match="nothing to edit yet"):
        _handler(demo, "edit_again")([], "make it blue", 3, 3.0, 1.5, 2)


def test_demo_controls_come_from_the_option_schema(model_dir, tmp_path):  # noqa: F811
    """Slider ranges and labels are GenerateOptions' `ui` and help; an oversize upload is refused from its
    header (a 41 KB 1-bit PNG of 12000x12000), before it is decoded."""
    demo = build_demo(Pipeline.from_pretrained(model_dir, device="cpu"))
    sliders = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Slider)}
    for name in ("steps", "cfg", "cfg_img"):
        meta = FIELDS[name].metadata
        slider = sliders[meta["help"][0].upper() + meta["help"][1:]]
        assert (slider.minimum, slider.maximum, slider.step) == meta["ui"]
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb, optimize=True)
    with pytest.raises(gr.Error, match="uploaded image .* is 12000x12000 .*more than the limit of 16777216 pixels"):
        _handler(demo, "edit")(str(bomb), "make it blue", 0, 3.0, 1.5, 2)


WATCH = """() => {
    window.seen = {status: [], images: new Set()};
    const record = () => {
        const text = document.querySelector('#t2i-status').innerText.trim();
        if (text && text !== window.seen.status.at(-1)) window.seen.status.push(text);
        document.querySelectorAll('#t2i-gallery img').forEach(img => window.seen.images.add(img.src));
    };
    new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true,
                                                         attributes: true});
}"""


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_demo_shows_the_image_forming_before_the_final_one(demo_url, model_dir):  # noqa: F811
    """The gallery shows partial images (their status names the token rows drawn) before the final image."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(demo_url, wait_until="load")  # not networkidle: the page keeps a heartbeat open (gr.State)
            page.evaluate(WATCH)
            page.locator("#t2i-prompt textarea").fill("a red circle")
            page.locator("#t2i-run").click()
            page.wait_for_function("() => window.seen.status.at(-1) === 'Done'", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "demo_progressive.png"), full_page=True)
            status = page.evaluate("() => window.seen.status")
            images = page.evaluate("() => window.seen.images.size")
        finally:
            browser.close()
    partial = [s for s in status if s.startswith("Partial image:")]
    assert partial and status.index(partial[0]) < status.index("Done"), status
    assert partial[0].endswith("token rows drawn") and images >= 2, (status, images)
