"""`docl-flower filter serve`: the upload service decides as `filter check` does, and holds.

Most tests run the app in-process (FastAPI's TestClient); one starts the real command.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.features.extractors import Identity
from docl_flower.core.filter.global_filter import GlobalFilter, ScoringConfig
from docl_flower.core.filter.store import META_FILE, save_filter
from docl_flower.operations import deciding, serve
from docl_flower.operations.check import load_image
from docl_flower.operations.check import main as check_main
from docl_flower.operations.credentials import make_certificates
from docl_flower.operations.deciding import FilterError
from docl_flower.operations.serve import create_app, default_token_path, read_token

from .conftest import PROJECT_ROOT, random_registration

CLI = str(Path(sys.executable).parent / "docl-flower")
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PNG = {**AUTH, "Content-Type": "image/png"}
SHAPE = [28, 28]
INFO = {
    "config": {
        "features": {"_target_": "docl_flower.core.features.Identity"},
        "guard": {"alpha": 1.5, "max_alpha": 2.0},
        "dataset": {"image_shape": SHAPE},
    }
}


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(side: int = 20000) -> bytes:
    """A valid PNG header that declares ``side`` x ``side`` grey pixels (a few hundred bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def digits(tiny_root: Path) -> np.ndarray:
    """200 MNIST test digits (uint8, 28 x 28), 20 of each class."""
    images, labels = IdxDataset("mnist", str(tiny_root / "mnist"), verify=False).load("test")
    keep = np.concatenate([np.flatnonzero(labels == c)[:20] for c in range(10)])
    return images[keep]


@pytest.fixture(scope="module")
def uploads(digits: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The digits as PNG files, in name order."""
    folder = tmp_path_factory.mktemp("uploads")
    paths = []
    for i, pixels in enumerate(digits):
        path = folder / f"{i:03d}.png"
        path.write_bytes(_png_bytes(pixels))
        paths.append(path)
    return paths


def _registrations(digits: np.ndarray, users: tuple[int, ...] = (0, 1, 2)) -> list:
    """Random 784-8-784 autoencoders whose intervals cut the digits' scores in the middle.

    So that the decisions mix block and share, and owners differ from image to image.
    """
    rng = np.random.default_rng(7)
    regs = [random_registration(rng, u, u, dim=784, hidden=8) for u in users]
    scores = GlobalFilter(regs, ScoringConfig(kernel="torch")).scores(Identity()(digits))
    out = []
    for i, reg in enumerate(regs):
        col = scores[:, i].double()
        out.append(replace(reg, err_mean=float(col.median()), err_std=float(col.std()) * 0.2))
    return out


@pytest.fixture(scope="module")
def saved(digits: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-user filter (read only: tests that change it work on a copy)."""
    folder = tmp_path_factory.mktemp("served") / "filter"
    save_filter(folder, _registrations(digits), info=INFO)
    return folder


@pytest.fixture
def copy(saved: Path, tmp_path: Path) -> Path:
    """A copy of the filter this test may change."""
    return Path(shutil.copytree(saved, tmp_path / "filter"))


def _client(folder: Path, **settings: object) -> TestClient:
    """A client of the service; the filters built here carry no probe records (see
    :func:`test_only_autoencoders_a_probe_check_vouches_for_are_served` for those)."""
    return TestClient(create_app(folder, token=TOKEN, **{"allow_unchecked": True, **settings}))


def _metric(client: TestClient, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` (``name`` as the text format writes it)."""
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name} {labels} in /metrics")


def _is_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


# ---------------------------------------------------------------------------- exactness


def test_rows_are_decided_alike_whatever_else_is_in_the_batch(saved, digits):
    # Prepare: the decisions of all 200 digits at once.
    loaded = deciding.load(saved)
    whole = deciding.decide(loaded, digits, 1)
    # Execute: the same digits in batches of every size the service may form.
    parts = []
    for size in (1, 2, 3, 5, 7, 12, 13, 17, 64):
        for start in (0, 1, 130):
            parts.append((start, deciding.decide(loaded, digits[start : start + size], 1)))
    # Assert: bit-identical scores, decisions, owners and intervals.
    for start, decided in parts:
        assert decided == whole[start : start + len(decided)], start
    assert {d.decision for d in whole} == {"block", "share"}
    assert len({d.owner for d in whole}) > 1
    # (the fused kernel scores up to ROWS_MAX images another way: never used here)
    assert deciding.MIN_ROWS > GlobalFilter.ROWS_MAX


def test_the_service_decides_bit_identically_to_filter_check(saved, uploads, capsys):
    # Prepare: filter check's rows, and decide() on the same stacked images.
    assert check_main([str(saved), str(uploads[0].parent), "--uploader", "1"]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [Path(row[0]) for row in printed] == uploads
    stacked = np.stack([load_image(p, SHAPE) for p in uploads])
    direct = deciding.decide(deciding.load(saved), stacked, 1)
    # Execute: every file alone, eight at a time (the batcher forms batches of 1-7), and all
    # of them in one batch request (batches of 7: 28 of them, and one of 4).
    with _client(saved, max_batch=7, max_delay_ms=20, max_files=200) as client:

        def one(path: Path) -> dict:
            response = client.post("/v1/check?uploader=1", content=path.read_bytes(), headers=PNG)
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(8) as pool:
            singles = list(pool.map(one, uploads))
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in uploads]
        batch = client.post("/v1/check-batch?uploader=1", files=files, headers=AUTH)
        batches = _metric(client, "docl_serve_batch_size_count")
    # Assert
    assert batch.status_code == 200, batch.text
    items = batch.json()["results"]
    assert [item["index"] for item in items] == list(range(200))
    assert [item["filename"] for item in items] == [p.name for p in uploads]
    assert 29 + 200 / 7 <= batches < 229  # the batch request: 29 batches; singles: batched too
    for row, d, single, item in zip(printed, direct, singles, items, strict=True):
        for answer in (single, item["result"]):
            lo, hi = answer["interval"]
            assert [
                str(answer["predicted_owner"]),
                str(answer["predicted_class"]),
                f"{answer['score']:.3f}",
                f"[{lo:.3f}, {hi:.3f}]",
                answer["decision"],
            ] == row[1:]
            # full precision: the JSON float is the float32 score itself
            assert answer["score"] == d.score and [lo, hi] == [d.low, d.high]
            assert answer["decision"] == d.decision and answer["predicted_owner"] == d.owner
            assert answer["uploader"] == 1


EXTRACTORS = {
    # the face pipeline (dlib) on ORL photos, as a face run saves its filter
    "faces": (
        {"_target_": "docl_flower.core.features.FaceDescriptor"},
        [112, 92],
        128,
    ),
    # an image folder of RGB photos through the ImageNet CNN (conf/features/imagenet.yaml)
    "image folder": (
        {
            "_target_": "docl_flower.core.features.EfficientNetLite0",
            "low": 0.0,
            "high": 6.0,
            "image_size": 224,
            "mean": 127.0,
            "std": 128.0,
            "batch_size": 4,
            "weights": None,
        },
        [48, 48, 3],
        1280,
    ),
}


def _photos(kind: str, folder: Path) -> list[Path]:
    if kind == "faces":
        root = PROJECT_ROOT / "data" / "att-faces"
        return [root / f"s{p}" / f"{i}.pgm" for p in (1, 2, 3) for i in (1, 2)]
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(48, 48), (60, 80), (32, 32), (100, 40), (48, 48), (64, 64)]):
        path = folder / f"{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("kind", list(EXTRACTORS))
def test_faces_and_image_folders_are_decided_as_filter_check_decides_them(kind, tmp_path):
    # Prepare: a filter of the extractor's dimension, and filter check's decisions.
    features, shape, dim = EXTRACTORS[kind]
    rng = np.random.default_rng(1)
    regs = [random_registration(rng, u, u, dim=dim, hidden=4) for u in (0, 1, 2)]
    info = {
        "config": {
            "features": features,
            "guard": {"alpha": 1.5, "sided": "one"},
            "dataset": {"image_shape": shape},
        }
    }
    save_filter(tmp_path / "filter", regs, info=info)
    photos = _photos(kind, tmp_path / "photos")
    stacked = np.stack([load_image(p, tuple(shape)) for p in photos])
    # intervals that cut the photos' scores in the middle: decisions of both kinds
    loaded = deciding.load(tmp_path / "filter")
    scores = deciding.scores_of(loaded, deciding.features_of(loaded, stacked)).double()
    regs = [
        replace(r, err_mean=float(scores[:, i].median()), err_std=float(scores[:, i].std()) * 0.1)
        for i, r in enumerate(regs)
    ]
    save_filter(tmp_path / "filter", regs, info=info)
    direct = deciding.decide(deciding.load(tmp_path / "filter"), stacked, 2)
    assert {d.decision for d in direct} == {"block", "share"}
    # Execute: each photo alone (raw bytes), and all of them in one batch request.
    with _client(tmp_path / "filter", max_batch=4) as client:
        info_served = client.get("/v1/filter", headers=AUTH).json()
        singles = []
        for p in photos:
            kind_header = {"Content-Type": "application/octet-stream"}
            response = client.post(
                "/v1/check?uploader=2", content=p.read_bytes(), headers={**AUTH, **kind_header}
            )
            assert response.status_code == 200, response.text
            singles.append(response.json())
        files = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in photos]
        batch = client.post("/v1/check-batch?uploader=2", files=files, headers=AUTH)
    # Assert: the extractor and shape the filter carries, and the same answers to the bit.
    assert info_served["extractor"] == features["_target_"]
    assert info_served["image_shape"] == shape
    assert batch.status_code == 200, batch.text
    items = [item["result"] for item in batch.json()["results"]]
    for d, single, item in zip(direct, singles, items, strict=True):
        for answer in (single, item):
            low = None if d.low == -np.inf else d.low  # one-sided: JSON null
            assert answer["score"] == d.score and answer["interval"] == [low, d.high]
            assert (answer["decision"], answer["predicted_owner"]) == (d.decision, d.owner)


# ---------------------------------------------------------------------------- hostile input


@pytest.fixture(scope="module")
def client(saved: Path):
    with _client(saved, max_body_bytes=100_000, max_files=3) as c:
        yield c


def _good(client: TestClient, pixels: np.ndarray, uploader: int = 0) -> dict:
    response = client.post(
        f"/v1/check?uploader={uploader}", content=_png_bytes(pixels), headers=PNG
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_raw_and_multipart_uploads_get_the_same_answer(client, digits):
    raw = _good(client, digits[0])
    octet = client.post(
        "/v1/check?uploader=0",
        content=_png_bytes(digits[0]),
        headers={**AUTH, "Content-Type": "application/octet-stream"},
    )
    form = client.post(
        "/v1/check?uploader=0", files={"image": ("a.png", _png_bytes(digits[0]))}, headers=AUTH
    )
    assert octet.json() == raw and form.json() == raw
    assert set(raw) == {
        "decision",
        "predicted_owner",
        "predicted_class",
        "score",
        "interval",
        "uploader",
        "filter_version",
    }


HOSTILE_BODIES = {
    "empty body": (b"", 422, "empty_body", "no image"),
    "random bytes": (random.Random(0).randbytes(3000), 422, "bad_image", "not an image"),
    "text": (b"not an image\n", 422, "bad_image", "not an image"),
    "20000 x 20000 PNG (a bomb)": (_bomb_png(), 422, "bad_image", "pixels"),
    "body over the limit": (b"\x89PNG" + b"\0" * 100_000, 413, "body_too_large", "100000"),
}


@pytest.mark.parametrize(
    ("body", "status", "code", "says"), HOSTILE_BODIES.values(), ids=HOSTILE_BODIES
)
def test_a_hostile_body_gets_a_json_error(client, digits, body, status, code, says):
    response = client.post("/v1/check?uploader=0", content=body, headers=PNG)
    assert says in _is_error(response, status, code)["message"]
    _good(client, digits[0])  # and the service still decides


def test_a_truncated_png_is_refused(client, digits):
    whole = _png_bytes(digits[1])
    for cut in (8, 40, len(whole) // 2):  # (the last bytes are the IEND chunk: not needed)
        _is_error(client.post("/v1/check?uploader=0", content=whole[:cut], headers=PNG), 422)


def test_a_body_over_the_limit_is_refused_without_a_declared_length(client):
    def chunks():
        for _ in range(30):
            yield b"\0" * 10_000

    response = client.post("/v1/check?uploader=0", content=chunks(), headers=PNG)
    _is_error(response, 413, "body_too_large")


@pytest.mark.parametrize("kind", ["text/plain", "application/json", "", "multipart/mixed"])
def test_a_wrong_content_type_is_415(client, digits, kind):
    headers = {**AUTH, "Content-Type": kind} if kind else AUTH
    response = client.post("/v1/check?uploader=0", content=_png_bytes(digits[0]), headers=headers)
    _is_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "uploader", ["-2", "abc", "1e9", "1.0", "+1", " 1", "0x1", "", "1" * 19, "١", "-0"]
)
def test_a_malformed_uploader_is_422(client, digits, uploader):
    response = client.post(
        "/v1/check", params={"uploader": uploader}, content=_png_bytes(digits[0]), headers=PNG
    )
    _is_error(response, 422, "bad_uploader")


def test_a_missing_uploader_is_422_and_a_third_party_or_unknown_user_is_decided(client, digits):
    _is_error(client.post("/v1/check", content=_png_bytes(digits[0]), headers=PNG), 422)
    # as filter check: -1 is a third party; a user id that is not registered is decided too
    for uploader in (-1, 99):
        assert _good(client, digits[0], uploader)["uploader"] == uploader


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
    ],
    ids=["missing", "wrong", "basic", "longer", "shorter"],
)
def test_every_v1_endpoint_needs_the_token(client, digits, headers):
    calls = [
        ("POST", "/v1/check?uploader=0", {"content": _png_bytes(digits[0])}),
        ("POST", "/v1/check-batch?uploader=0", {"files": {"images": ("a.png", b"x")}}),
        ("GET", "/v1/filter", {}),
        ("GET", "/v1/stats", {}),
        ("POST", "/v1/reload", {}),
    ]
    for method, url, kwargs in calls:
        response = client.request(
            method, url, headers={"Content-Type": "image/png", **headers}, **kwargs
        )
        _is_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
    for url in ("/", "/healthz", "/readyz", "/metrics"):
        assert client.get(url).status_code == 200


def test_the_batch_endpoint_answers_each_file_in_order(client, digits):
    files = [
        ("images", ("good.png", _png_bytes(digits[2]), "image/png")),
        ("images", ("cut.png", _png_bytes(digits[3])[:50], "image/png")),
        ("images", ("empty.png", b"", "image/png")),
    ]
    response = client.post("/v1/check-batch?uploader=0", files=files, headers=AUTH)
    assert response.status_code == 200, response.text
    items = response.json()["results"]
    assert [(i["index"], i["filename"]) for i in items] == [
        (0, "good.png"),
        (1, "cut.png"),
        (2, "empty.png"),
    ]
    assert items[0]["result"] == _good(client, digits[2]) and items[0]["error"] is None
    assert items[1]["result"] is None and items[1]["error"]["code"] == "bad_image"
    assert items[2]["error"]["code"] == "empty_body"
    # more files than max_files, no file, a raw body, a broken multipart body
    _is_error(client.post("/v1/check-batch?uploader=0", files=files + files, headers=AUTH), 422)
    other = {"image": ("a.png", _png_bytes(digits[2]), "image/png")}  # not "images"
    _is_error(client.post("/v1/check-batch?uploader=0", files=other, headers=AUTH), 422)
    form = client.post("/v1/check-batch?uploader=0", data={"x": "1"}, headers=AUTH)
    _is_error(form, 415)  # (urlencoded)
    raw = client.post("/v1/check-batch?uploader=0", content=_png_bytes(digits[2]), headers=PNG)
    _is_error(raw, 415)
    broken = client.post(
        "/v1/check-batch?uploader=0",
        content=b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"},
    )
    _is_error(broken, 422, "bad_multipart")
    nob = client.post(
        "/v1/check-batch?uploader=0",
        content=b"garbage",
        headers={**AUTH, "Content-Type": "multipart/form-data"},
    )
    _is_error(nob, 422, "bad_multipart")


def test_hostile_requests_next_to_a_steady_stream_of_good_ones(saved, digits):
    # Prepare: what each good image must get, and a mix of hostile requests.
    loaded = deciding.load(saved)
    good = digits[:40]
    expected = deciding.decide(loaded, good, 2)
    rng = random.Random(1)
    whole = _png_bytes(digits[5])

    def hostile(client: TestClient, k: int) -> int:
        kind = k % 8
        if kind == 0:
            body, headers = rng.randbytes(rng.randrange(1, 5000)), PNG
        elif kind == 1:
            data = bytearray(whole)
            for _ in range(rng.randrange(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            body, headers = bytes(data), PNG
        elif kind == 2:
            body, headers = whole[: rng.randrange(len(whole))], PNG
        elif kind == 3:
            body, headers = _bomb_png(rng.choice([9000, 20000, 65535])), PNG
        elif kind == 4:
            body, headers = whole, {**AUTH, "Content-Type": rng.choice(["text/html", "x/y"])}
        elif kind == 5:
            body, headers = whole, {"Content-Type": "image/png", "Authorization": "Bearer x"}
        elif kind == 6:
            body, headers = b"\0" * 100_001, PNG
        else:
            up = rng.choice(["-5", "x", "1e3", "%00", "9" * 30])
            return client.post(f"/v1/check?uploader={up}", content=whole, headers=PNG).status_code
        response = client.post("/v1/check?uploader=0", content=body, headers=headers)
        if response.status_code != 200:
            _is_error(response, response.status_code)
        return response.status_code

    # Execute: one client sends the good images one after the other, three send 120 hostile
    # requests meanwhile.
    limits = {"max_body_bytes": 100_000, "max_batch": 8, "max_delay_ms": 2}
    app = create_app(saved, token=TOKEN, allow_unchecked=True, **limits)
    with TestClient(app) as client, ThreadPoolExecutor(3) as pool:
        hostiles = pool.map(lambda k: hostile(client, k), range(120))
        answers = [_good(client, image, 2) for image in good]
        statuses = list(hostiles)
    # Assert: every good request decided exactly; every hostile one a JSON 4xx (a mutated PNG
    # that still decodes is decided: 200).
    for answer, d in zip(answers, expected, strict=True):
        assert (answer["decision"], answer["score"]) == (d.decision, d.score)
    assert set(statuses) <= {200, 401, 413, 415, 422}, statuses
    assert {401, 413, 415, 422} <= set(statuses)


# ---------------------------------------------------------------------------- bounded


def test_a_full_queue_answers_503_with_retry_after(saved, digits, monkeypatch):
    # Prepare: a scorer that holds the first batch until told.
    entered, go = threading.Event(), threading.Event()
    real = serve.decide

    def slow(*args, **kwargs):
        entered.set()
        assert go.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve, "decide", slow)
    body = _png_bytes(digits[0])
    with _client(saved, max_queue=1, max_delay_ms=0) as client, ThreadPoolExecutor(2) as pool:

        def post() -> httpx.Response:
            return client.post("/v1/check?uploader=0", content=body, headers=PNG)

        first = pool.submit(post)
        assert entered.wait(30)  # the first image is being scored: it left the queue
        second = pool.submit(post)
        deadline = time.monotonic() + 30
        while _metric(client, "docl_serve_queue_depth") < 1:  # the second waits in the queue
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Execute
        third = post()
        go.set()
        # Assert: the third is turned away, the first two are decided.
        _is_error(third, 503, "queue_full")
        assert third.headers["retry-after"] == "1"
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert first.result().json() == second.result().json()
        assert _metric(client, "docl_serve_queue_depth") == 0


# ---------------------------------------------------------------------------- reload


def test_a_batch_being_scored_finishes_on_the_filter_it_started_with(copy, digits, monkeypatch):
    # Prepare: a scorer that holds the first batch until told.
    entered, go = threading.Event(), threading.Event()
    real = serve.decide

    def held(*args, **kwargs):
        entered.set()
        assert go.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve, "decide", held)
    pixels = digits[0]
    with _client(copy, max_delay_ms=0) as client, ThreadPoolExecutor(1) as pool:
        old = client.get("/v1/filter", headers=AUTH).json()["version"]
        first = pool.submit(_good, client, pixels)
        assert entered.wait(30)
        # Execute: a new user registers and the filter is reloaded while the batch is scored.
        owner = _owner_of(pixels, 3, np.random.default_rng(3))
        save_filter(copy, [*_registrations(digits), owner], info=INFO)
        reloaded = client.post("/v1/reload", headers=AUTH)
        go.set()
        # Assert: the batch in flight was decided by the old filter, the next by the new one.
        assert reloaded.status_code == 200, reloaded.text
        new = reloaded.json()["filter"]["version"]
        assert new != old
        assert first.result()["filter_version"] == old
        assert first.result()["predicted_owner"] != 3
        after = _good(client, pixels)
        assert (after["filter_version"], after["predicted_owner"]) == (new, 3)


def test_a_tampered_filter_is_refused_and_the_old_one_keeps_serving(copy, digits):
    with _client(copy) as client:
        before = client.get("/v1/filter", headers=AUTH).json()
        decided = _good(client, digits[0])
        # Prepare: someone edits an interval in filter.json (valid JSON, digest now wrong).
        meta = json.loads((copy / META_FILE).read_text())
        meta["entries"][0]["err_std"] *= 100
        (copy / META_FILE).write_text(json.dumps(meta))
        # Execute
        response = client.post("/v1/reload", headers=AUTH)
        # Assert
        error = _is_error(response, 422, "filter_invalid")
        assert "digest" in error["message"] or "sha256" in error["message"].lower(), error
        assert client.get("/v1/filter", headers=AUTH).json() == before
        assert _good(client, digits[0]) == decided
        assert _metric(client, "docl_serve_reloads_total", result="failed") == 1
        assert _metric(client, "docl_serve_reloads_total", result="ok") == 0


def test_a_filter_of_another_image_size_or_without_autoencoders_is_refused(copy, digits):
    with _client(copy) as client:
        version = client.get("/v1/filter", headers=AUTH).json()["version"]
        regs = _registrations(digits)
        other = {"config": {**INFO["config"], "dataset": {"image_shape": [14, 56]}}}
        save_filter(copy, regs, info=other)
        _is_error(client.post("/v1/reload", headers=AUTH), 409, "filter_incompatible")
        save_filter(copy, [], info=INFO)
        error = _is_error(client.post("/v1/reload", headers=AUTH), 422, "filter_invalid")
        assert "autoencoder" in error["message"]
        assert client.get("/v1/filter", headers=AUTH).json()["version"] == version
        assert _metric(client, "docl_serve_reloads_total", result="failed") == 2


def _owner_of(pixels: np.ndarray, user: int, rng: np.random.Generator):
    """An autoencoder of ``user`` that reconstructs ``pixels`` almost exactly (and little else)."""
    reg = random_registration(rng, user, user, dim=784, hidden=8)
    target = np.clip(pixels.reshape(-1) / 255.0, 0.001, 0.999)
    params = dict(reg.params)
    params["decoder.weight"] = np.zeros_like(params["decoder.weight"])
    params["decoder.bias"] = np.log(target / (1 - target)).astype(np.float32)
    score = float(
        GlobalFilter([replace(reg, params=params)], ScoringConfig(kernel="torch")).scores(
            Identity()(pixels[None])
        )[0, 0]
    )
    return replace(reg, params=params, err_mean=score, err_std=1.0)


PASSING = {
    "shares": {"harmless": 0.01, "noise": 0.0},
    "max_alpha": 2.0,
    "max_block_share": 0.02,
    "harmless_images": 1024,
    "noise_images": 64,
}


def _with_records(folder: Path, regs: list, records: list) -> None:
    """Save ``regs`` signed, entry ``i`` with probe record ``records[i]`` (None: none)."""
    extra = {i: ({"probe": r} if r is not None else {}) for i, r in enumerate(records)}
    save_filter(folder, regs, extra, info=INFO)


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (None, "no probe check recorded"),
        ({**PASSING, "shares": {"harmless": 0.05, "noise": 0.0}}, "5.0% of the harmless"),
        ({**PASSING, "shares": {"harmless": 0.0, "noise": 0.5}}, "50.0% of the noise"),
        ({**PASSING, "max_alpha": 1.0}, "up to alpha 1.0"),
        ({**PASSING, "max_alpha": "2"}, "up to alpha '2'"),
        ({**PASSING, "shares": {"harmless": float("nan"), "noise": 0.0}}, "not in [0, 1]"),
        ({**PASSING, "shares": {"harmless": -0.1, "noise": 0.0}}, "not in [0, 1]"),
        ({**PASSING, "shares": {"harmless": True}}, "not numbers"),
        ({**PASSING, "shares": {}}, "no harmless or noise shares"),
        ({**PASSING, "shares": {"other": 0.0}}, "no harmless or noise shares"),
        ({**PASSING, "harmless_images": 0, "noise_images": 0}, "(0, 0) probe images"),
        ({**PASSING, "noise_images": 1e3}, "probe images"),
        ([0.0], "not a mapping"),
    ],
)
def test_only_autoencoders_a_probe_check_vouches_for_are_served(copy, digits, record, why):
    # Prepare: every autoencoder carries the record of a passing probe check.
    regs = _registrations(digits)
    _with_records(copy, regs, [PASSING] * 3)
    with _client(copy, allow_unchecked=False) as client:
        old = client.get("/v1/filter", headers=AUTH).json()
        before = _good(client, digits[0], 0)
        # Execute: a run adds user 3 with this record, and the operator asks for a reload.
        _with_records(copy, [*regs, replace(regs[0], user_id=3)], [PASSING] * 3 + [record])
        response = client.post("/v1/reload", headers=AUTH)
        # Assert: refused with the user, the class and the reason; the old filter serves on.
        assert response.status_code == 422, response.text
        message = response.json()["error"]["message"]
        assert "1 of 4 autoencoders are not vouched for" in message, message
        assert "user 3 class 0" in message and why in message, message
        assert client.get("/v1/filter", headers=AUTH).json() == old
        assert _good(client, digits[0], 0) == before
    # The same filter is refused at start, also with --allow-unchecked unless the record is
    # merely missing.
    with pytest.raises(FilterError, match="not vouched for"):
        create_app(copy, token=TOKEN)
    if record is None:
        with _client(copy) as client:
            assert client.get("/v1/filter", headers=AUTH).json()["users"] == [0, 1, 2, 3]
    else:
        with pytest.raises(FilterError, match=re.escape(why)):
            create_app(copy, token=TOKEN, allow_unchecked=True)


def test_the_service_holds_records_to_its_own_limit(copy, digits):
    # A run configured with max_block_share 0.5 saved a record of 10%: the service's default
    # limit (2%) refuses it; an operator who states 0.1 serves it.
    regs = _registrations(digits)
    loose = {**PASSING, "shares": {"harmless": 0.1, "noise": 0.0}, "max_block_share": 0.5}
    _with_records(copy, regs, [PASSING, PASSING, loose])
    with pytest.raises(FilterError, match=r"user 2 class 2: .*10\.0% of the harmless"):
        create_app(copy, token=TOKEN)
    with _client(copy, allow_unchecked=False, max_block_share=0.1) as client:
        assert client.get("/v1/filter", headers=AUTH).json()["users"] == [0, 1, 2]
    with pytest.raises(ValueError, match="max_block_share"):
        create_app(copy, token=TOKEN, max_block_share=float("nan"))


@pytest.mark.parametrize("how", ["POST /v1/reload", "polling filter.json"])
def test_a_new_user_changes_the_decisions_after_a_reload(copy, digits, how):
    # Prepare: a digit that user 0 may share today.
    regs = _registrations(digits)
    pixels = next(
        digits[i]
        for i, d in enumerate(deciding.decide(deciding.load(copy), digits, 0))
        if d.decision == "share"
    )
    poll = 0.1 if how.startswith("polling") else 0.0
    with _client(copy, poll_s=poll) as client:
        before = _good(client, pixels, 0)
        assert before["decision"] == "share"
        old = client.get("/v1/filter", headers=AUTH).json()
        # Execute: a run registers user 3, whose photos this digit resembles.
        new = [*regs, _owner_of(pixels, 3, np.random.default_rng(3))]
        save_filter(copy, new, info=INFO)
        if poll:
            deadline = time.monotonic() + 20
            while client.get("/v1/filter", headers=AUTH).json()["version"] == old["version"]:
                assert time.monotonic() < deadline, "the poller did not reload"
                time.sleep(0.05)
        else:
            response = client.post("/v1/reload", headers=AUTH)
            assert response.status_code == 200, response.text
            assert response.json()["changed"] is True
            assert response.json()["previous_version"] == old["version"]
        # Assert: user 3 is served, and user 0 may no longer share the digit.
        info = client.get("/v1/filter", headers=AUTH).json()
        after = _good(client, pixels, 0)
        assert info["users"] == [0, 1, 2, 3] and info["autoencoders"] == 4
        assert (after["decision"], after["predicted_owner"]) == ("block", 3)
        assert after["filter_version"] == info["version"] != before["filter_version"]
        assert _good(client, pixels, 3)["decision"] == "share"  # its owner may
        assert _metric(client, "docl_serve_reloads_total", result="ok") == 1
        assert _metric(client, "docl_serve_filter_users") == 4


# ---------------------------------------------------------------------------- schema, token


def test_the_openapi_schema_names_every_v1_response(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/v1/check",
        "/v1/check-batch",
        "/v1/filter",
        "/v1/stats",
        "/v1/reload",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    named = {}
    for path, methods in schema["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in methods.items():
            for status, response in operation["responses"].items():
                content = response.get("content", {})
                assert list(content) == ["application/json"], (path, status)
                ref = content["application/json"]["schema"].get("$ref", "")
                assert ref.startswith("#/components/schemas/"), (path, status, ref)
                named[(method, path, status)] = ref.rsplit("/", 1)[1]
    assert named[("post", "/v1/check", "200")] == "CheckResult"
    assert named[("post", "/v1/check-batch", "200")] == "CheckBatchResponse"
    assert named[("get", "/v1/filter", "200")] == "FilterInfo"
    assert named[("get", "/v1/stats", "200")] == "Stats"
    assert named[("post", "/v1/reload", "200")] == "ReloadResponse"
    assert named[("post", "/v1/check", "503")] == "ErrorResponse"
    body = schema["paths"]["/v1/check"]["post"]["requestBody"]["content"]
    assert {"image/*", "application/octet-stream", "multipart/form-data"} <= set(body)


def test_the_token_file_is_created_private_and_read_back(tmp_path):
    path = tmp_path / "conf" / "serve.token"
    token = read_token(path)
    assert len(token) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token(path) == token
    assert default_token_path() == Path(os.environ["DOCL_FLOWER_FILTER_KEY"]).parent / "serve.token"
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ValueError, match="at least 16"):
        read_token(tmp_path / "short")


# ---------------------------------------------------------------------------- the command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_command_refuses_bad_settings_in_one_line(copy, tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    ok = [str(copy), "--token-file", str(token)]
    for argv in (
        [str(tmp_path / "nowhere"), "--token-file", str(token)],
        [*ok, "--certfile", str(tmp_path / "cert.pem")],
        [*ok, "--port", "70000"],
        [*ok, "--max-batch", "0"],
        [*ok, "--alpha", "nan"],
    ):
        with pytest.raises(SystemExit) as exc:
            serve.main(argv)
        assert exc.value.code == 2, argv
        assert capsys.readouterr().err.startswith("usage: docl-flower filter serve"), argv
    (tmp_path / "short").write_text("abc")
    assert serve.main([str(copy), "--token-file", str(tmp_path / "short")]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert serve.main(ok) == 2  # hand-built: no probe records
    assert "not vouched for by a probe check" in capsys.readouterr().err
    ok.append("--allow-unchecked")
    assert serve.main([*ok, "--alpha", "3"]) == 2  # above the filter's max_alpha
    assert "max_alpha 2" in capsys.readouterr().err
    text = (copy / META_FILE).read_text()
    assert '"label":1' in text
    (copy / META_FILE).write_text(text.replace('"label":1', '"label":7'))  # not signed
    assert serve.main(ok) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot read the filter" in err, err


def test_the_command_serves_over_tls_and_drains_requests_in_flight_on_sigterm(
    saved, digits, tmp_path
):
    # Prepare: the real command with a TLS certificate, a token file it creates, batches held
    # for 1.5 s.
    port = _free_port()
    token_file = tmp_path / "token"
    ca, cert, key = make_certificates(tmp_path / "tls", ["127.0.0.1"])
    tls = ssl.create_default_context(cafile=str(ca))
    settings = {"--port": port, "--token-file": token_file, "--max-delay-ms": 1500}
    settings |= {"--max-batch": 64, "--certfile": cert, "--keyfile": key}
    options = [str(x) for kv in settings.items() for x in kv] + ["--allow-unchecked"]
    proc = subprocess.Popen(
        [CLI, "filter", "serve", str(saved), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"{base}/readyz", timeout=1, verify=tls).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
        expected = deciding.decide(deciding.load(saved), digits[:4], 1)

        def post(i: int) -> httpx.Response:
            return httpx.post(
                f"{base}/v1/check?uploader=1",
                content=_png_bytes(digits[i]),
                headers={**headers, "Content-Type": "image/png"},
                timeout=30,
                verify=tls,
            )

        filter_info = httpx.get(f"{base}/v1/filter", headers=headers, verify=tls)
        assert filter_info.json()["users"] == [0, 1, 2]
        assert httpx.get(f"{base}/v1/filter", verify=tls).status_code == 401
        with pytest.raises(httpx.ConnectError):  # a server certificate no CA vouches for
            httpx.get(f"{base}/healthz", timeout=5)
        for i in range(2):  # both decoder workers started: the four below decode at once
            assert post(i).status_code == 200
        # Execute: four requests wait in the batcher; then SIGTERM.
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(post, i) for i in range(4)]
            deadline = time.monotonic() + 30
            while not re.search(
                r"^docl_serve_queue_depth 4\.0$",
                httpx.get(f"{base}/metrics", verify=tls).text,
                re.M,
            ):
                assert time.monotonic() < deadline and not any(f.done() for f in futures)
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in futures]
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    # Assert: every request in flight was answered, the command exited 0.
    for answer, d in zip(answers, expected, strict=True):
        assert answer.status_code == 200, answer.text
        assert (answer.json()["decision"], answer.json()["score"]) == (d.decision, d.score)
    assert code == 0, err
    assert "Traceback" not in err
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=2, verify=tls)
