"""A real browser on the real reviewer service: sign in, claim, label by keyboard, read the label from Kafka.

Debian's Chromium (scripts/install_browser.sh) is driven by Playwright; the service runs exactly as operators
start it (``sieve reviewer serve``) against the session's real Kafka and Redis.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from services.common.banks.embeddings import EmbeddingBanks
from services.common.config import DecodeSettings, Settings
from services.common.imaging import decode_image
from services.common.kafka_io import AckedProducer, ensure_topics
from services.common.photos.build import Manifest
from services.common.schemas import (
    BankMatchEvidence,
    DuplicateMatch,
    FeedbackLabel,
    MatchEvidence,
    ReviewReason,
    ReviewRequest,
)
from services.common.transforms import NEAR_DUPLICATES, encode_jpeg
from services.reviewer.queue import QueueKeys
from tests.e2e.conftest import SIEVE, pick_photos, read_topic, write_photo

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "alice-browser-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@pytest.fixture()
def reviewer_server(stack_env: dict[str, str], settings: Settings, tmp_path: Path) -> Iterator[str]:
    """``sieve reviewer serve`` on a free port; yields its base URL once /readyz says ready."""
    ensure_topics(settings.kafka)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({TOKEN: {"reviewer_id": "alice", "role": "reviewer"}}))
    port = _free_port()
    env = {
        **os.environ,
        **stack_env,
        "SIEVE_REVIEWER_TOKENS_FILE": str(tokens),
        "SIEVE_REVIEWER_CONSUMER_GROUP": f"reviewer-{settings.redis.key_prefix}",
    }
    log_path = tmp_path / "reviewer.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*SIEVE, "reviewer", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while _get(f"{base}/readyz")[0] != 200:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "reviewer not ready:\n" + log_path.read_text(errors="replace")
            time.sleep(0.3)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert TOKEN not in log_path.read_text(errors="replace"), "the service logged a token"


def _plant(settings: Settings, manifest: Manifest, folder: Path) -> tuple[ReviewRequest, ...]:
    """Three review requests over real photos: a near-duplicate with its original as top neighbour (verified with
    keypoints), a flag, and a near copy of an image banked in a watch list."""
    p1, p2, p3, p4 = pick_photos(manifest, 4, seed=11)
    original = write_photo(manifest, p1, folder, "orig-0412")
    other = write_photo(manifest, p2, folder, "orig-0977")
    flagged = write_photo(manifest, p3, folder, "up-flag-0031")
    with Image.open(original) as img:
        copy = folder / "up-copy-0007.jpg"
        copy.write_bytes(encode_jpeg(NEAR_DUPLICATES["crop90_jpeg50"](img.convert("RGB")), 85))
    # What the moderator records for every upload it sees, so the page can show neighbours' images.
    client = redis.Redis.from_url(settings.redis.url.get_secret_value())
    keys = QueueKeys(settings.redis.key_prefix)
    for uid, path in (("orig-0412", original), ("orig-0977", other)):
        client.set(keys.upload_uri(uid), path.as_uri())
    # A watch-list bank holding an image (its model input kept, as `sieve banks add` keeps it), and an upload the
    # moderator sent to review as a near copy of it.
    banked = write_photo(manifest, p4, folder, "banked-0001")
    pixels = decode_image(banked.read_bytes(), DecodeSettings(), 256).pixels
    vector = np.ones((1, 8), dtype=np.float32)
    EmbeddingBanks(client, settings.redis.key_prefix).add(
        "watch-list", "sieve_embedder:2", ["banked-0001"], vector, pixels[None]
    )
    with Image.open(banked) as img:
        near_copy = folder / "up-bank-0050.jpg"
        near_copy.write_bytes(encode_jpeg(NEAR_DUPLICATES["crop90_jpeg50"](img.convert("RGB")), 85))
    client.close()
    duplicate = ReviewRequest(
        upload_id="up-copy-0007",
        image_uri=copy.as_uri(),
        reason=ReviewReason.NEAR_THRESHOLD_DUPLICATE,
        priority=0.92,
        scores={"safe": 0.81, "nsfw": 0.07, "violence": 0.04, "spam": 0.12},
        neighbours=[
            DuplicateMatch(upload_id="orig-0412", score=0.913),
            DuplicateMatch(upload_id="orig-0977", score=0.41),
        ],
        model_version="sieve_embedder:2",
        evidence=[MatchEvidence(upload_id="orig-0412", cosine=0.774, inliers=42, score=0.913)],
    )
    flag = ReviewRequest(
        upload_id="up-flag-0031",
        image_uri=flagged.as_uri(),
        reason=ReviewReason.UNCERTAIN_FLAG,
        priority=0.55,
        scores={"nsfw": 0.62, "safe": 0.3, "violence": 0.05, "spam": 0.02},
        neighbours=[DuplicateMatch(upload_id="orig-0977", score=0.38)],
        model_version="sieve_embedder:2",
    )
    watched = ReviewRequest(
        upload_id="up-bank-0050",
        image_uri=near_copy.as_uri(),
        reason=ReviewReason.BANK_MATCH,
        priority=0.3,
        scores={"nsfw": 0.02, "safe": 0.9, "violence": 0.01, "spam": 0.01},
        model_version="sieve_embedder:2",
        bank_matches=[
            BankMatchEvidence(
                bank="watch-list",
                signal_type="embedding",
                distance=0.19,
                item_id="banked-0001",
                score=0.874,
                inliers=37,
                action="review",
            )
        ],
    )
    producer = AckedProducer(settings.kafka)
    for r in (duplicate, flag, watched):
        producer.produce(settings.kafka.topic_review, r.upload_id, r.model_dump_json().encode())
    producer.flush(30)
    return duplicate, flag, watched


def _publish_to_docs(shot: Path) -> None:
    """The README's pictures come from this test; refreshed only on request, so a test run leaves git clean."""
    if os.environ.get("SIEVE_UPDATE_DOC_IMAGES") == "1":
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "img" / shot.name)


def test_a_reviewer_labels_in_the_browser_and_the_label_reaches_kafka(
    reviewer_server: str, settings: Settings, photo_set: Manifest, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.fail("no /usr/bin/chromium: run scripts/install_browser.sh")
    from playwright.sync_api import expect, sync_playwright

    duplicate, flag, watched = _plant(settings, photo_set, tmp_path)
    deadline = time.monotonic() + 60
    while json.loads(_get(f"{reviewer_server}/api/queue/stats", TOKEN)[1] or b"{}").get("pending") != 3:
        assert time.monotonic() < deadline, "the service did not ingest the review requests"
        time.sleep(0.3)

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 860})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(reviewer_server + "/")

            page.fill("#token", "wrong-token-0123456789abcdef")
            page.click("#login-button")
            expect(page.locator("#login-error")).to_have_text("That token was not accepted.")
            problems.clear()  # the browser logs the refused sign-in's 401 itself

            page.fill("#token", TOKEN)
            page.click("#login-button")
            page.wait_for_selector("body[data-item-loaded='true']", timeout=30_000)
            expect(page.locator("#who-id")).to_have_text("alice")
            expect(page.locator("#item-id")).to_have_text(duplicate.upload_id)  # the highest priority first
            expect(page.locator(".nb")).to_have_count(2)
            expect(page.locator(".nb.top .id")).to_have_text("orig-0412")
            expect(page.locator(".nb.top .inliers")).to_have_text("42 inliers")  # the keypoint evidence
            expect(page.locator(".nb .inliers")).to_have_count(1)  # the other neighbour was not verified
            expect(page.locator("#bank-evidence")).to_be_hidden()
            # The served version 2 has a spatial transformer: its canonical-pose view of the upload is shown.
            expect(page.locator("#aligned-fig")).to_be_visible()
            loaded = page.eval_on_selector_all(
                "#img-upload, .nb img, #img-aligned", "els => els.map(e => e.complete && e.naturalWidth > 0)"
            )
            assert loaded == [True, True, True, True], loaded
            page.mouse.move(0, 0)  # no hover highlight in the picture
            shot = tmp_path / "reviewer.png"
            page.screenshot(path=str(shot), full_page=True)
            _publish_to_docs(shot)

            expect(page.locator("#explain-buttons button")).to_have_count(2)
            page.keyboard.press("w")  # why does the top match match: drawn by the served model on demand
            page.wait_for_selector("#explain-fig[data-loaded='true']", timeout=60_000)
            expect(page.locator("#explain-which")).to_have_text("upload vs orig-0412")
            width = page.eval_on_selector("#img-explain", "e => e.complete ? e.naturalWidth : 0")
            assert width >= 900, width  # the explain picture, not a placeholder
            page.locator("#explain-fig").screenshot(path=str(tmp_path / "reviewer-explain.png"))
            _publish_to_docs(tmp_path / "reviewer-explain.png")

            page.keyboard.press("d")  # duplicate of the top neighbour
            expect(page.locator("#item-id")).to_have_text(flag.upload_id, timeout=30_000)
            expect(page.locator("#status")).to_contain_text("up-copy-0007 labelled: duplicate of orig-0412")
            page.wait_for_selector("body[data-item-loaded='true']")
            page.screenshot(path=str(tmp_path / "reviewer-second.png"), full_page=True)
            page.keyboard.press("2")  # the second category: nsfw
            expect(page.locator("#item-id")).to_have_text(watched.upload_id, timeout=30_000)
            expect(page.locator("#status")).to_contain_text("up-flag-0031 labelled: nsfw")
            page.wait_for_selector("body[data-item-loaded='true']")
            # Sent by a watch-list bank: which bank, by which signal, how near, and the banked image beside it.
            expect(page.locator("#bank-evidence .bank")).to_have_count(1)
            expect(page.locator("#bank-evidence .bank-head")).to_contain_text("watch-list")
            expect(page.locator("#bank-evidence .bank-how")).to_have_text(
                "embedding · score 0.874 · 37 inliers · item banked-0001"
            )
            banked = page.eval_on_selector(".bank-image", "e => e.complete ? [e.naturalWidth, e.naturalHeight] : []")
            assert banked == [256, 256], banked  # the banked model input, served by the reviewer
            page.screenshot(path=str(tmp_path / "reviewer-bank.png"), full_page=True)
            page.keyboard.press("1")  # the first category: safe
            expect(page.locator("#empty")).to_be_visible(timeout=30_000)
            page.screenshot(path=str(tmp_path / "reviewer-after.png"), full_page=True)
        finally:
            browser.close()
    assert problems == [], problems

    records = read_topic(settings, settings.kafka.topic_feedback, expected=3, timeout_s=60)
    labels = {r["upload_id"]: FeedbackLabel.model_validate(r) for r in records}
    assert len(records) == 3, records
    assert labels[duplicate.upload_id].duplicate_of == "orig-0412"
    # Everything the retraining job needs to make a training pair, with no further look-up.
    assert labels[duplicate.upload_id].image_uri == duplicate.image_uri
    assert labels[duplicate.upload_id].compared_with == "orig-0412"
    assert labels[duplicate.upload_id].compared_uri == (tmp_path / "orig-0412.jpg").as_uri()
    assert labels[duplicate.upload_id].reviewer_id == "alice"
    assert labels[flag.upload_id].categories == {"safe": False, "nsfw": True, "violence": False, "spam": False}
    assert labels[flag.upload_id].duplicate_of is None and not labels[flag.upload_id].not_duplicate
    if os.environ.get("SIEVE_KEEP_SCREENSHOTS"):
        print(f"screenshots in {tmp_path}", file=sys.stderr)
