"""``docl-flower filter serve``: an HTTP upload service in front of a saved filter.

    docl-flower filter serve FILTER_DIR [--host 127.0.0.1] [--port 8080] [--alpha A]
        [--guard paper|strict] [--token-file PATH] [--max-batch N] [--max-delay-ms MS]
        [--max-queue N] [--certfile CERT --keyfile KEY]

A versioned JSON API (``/v1``) decides block or share for uploaded images exactly as
``docl-flower filter check`` does for the same files (same decoding, features, scores and
Guard: :mod:`.deciding`):

``POST /v1/check?uploader=ID``
    One image: the raw bytes (``Content-Type: image/*`` or ``application/octet-stream``) or a
    ``multipart/form-data`` field ``image``.
``POST /v1/check-batch?uploader=ID``
    Several ``multipart/form-data`` files named ``images``; one answer per file, in order (an
    unreadable file gets its own error, the others are decided).
``GET /v1/filter``
    Users, classes, extractor, Guard, alpha, version (SHA-256 of ``filter.json``), size.
``GET /v1/stats``
    Images decided since the service started, by outcome (block, share, error).
``POST /v1/reload``
    Read the filter folder again, verify it and swap it in; a filter that fails is refused
    (422, or 409 when it needs another image size) and the old one keeps serving.

A filter is served only when it verifies: every file's SHA-256, the HMAC of ``filter.json``,
and for every autoencoder the probe record its run saved (the share of the provider's harmless
and noise probe images in the region it can block, judged up to the served alpha), which must
be within ``--max-block-share`` (default 2%, the run's default): a run configured with a looser
limit cannot slip a catch-all into the service. ``--allow-unchecked`` serves autoencoders
saved without a record (filters from before the records).

``GET /`` is the operator page (:data:`PAGE_FILE`): it holds no filter data and calls the
``/v1`` API with the token the operator types in. It is served with a Content-Security-Policy
that allows only its own inline script and style (by SHA-256 hash) and requests to this origin.

``/``, ``/healthz``, ``/readyz`` and ``/metrics`` (Prometheus text) need no token; every ``/v1``
endpoint needs ``Authorization: Bearer TOKEN`` (the token file, created with 32 random bytes
and mode 0600 when missing). Every error is ``{"error": {"code": ..., "message": ...}}``.

Requests are scored in batches: one batcher task takes up to ``max_batch`` decoded images from
a queue, waiting at most ``max_delay_ms`` after the first, and scores them with one
``GlobalFilter.scores`` call in a worker thread. At most ``max_queue`` images wait (being read,
decoded or queued); more get 503 with ``Retry-After``. Uploaded bytes are decoded as hostile
files in decoder worker processes (:mod:`docl_flower.core.data.decode`), never in the event
loop. SIGTERM or SIGINT: the server stops accepting, answers the requests in flight, the
batcher empties its queue, and the command exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import queue
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from numpy.typing import NDArray
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from docl_flower.core.common.files import create_file_atomic, file_stamp
from docl_flower.core.data.decode import ImageDecoder, ImageReadError
from docl_flower.core.data.folders import IMAGE_FORMATS
from docl_flower.core.filter.global_filter import GUARDS
from docl_flower.core.filter.probe import DEFAULT_MAX_BLOCK_SHARE
from docl_flower.core.filter.store import META_FILE, filter_key_path

from .check import _alpha as alpha_type
from .check import _filter_dir as filter_folder
from .deciding import Decision, FilterError, LoadedFilter, decide, load, one_line, unvouched

log = logging.getLogger(__name__)

PROG = "docl-flower filter serve"
#: Name of the default token file, next to the filter key.
TOKEN_FILE = "serve.token"
#: Shortest token accepted from a token file (characters).
MIN_TOKEN_CHARS = 16
#: Seconds a client is told to wait when the queue is full or the server is stopping.
RETRY_AFTER_S = 1

MAX_BATCH = 32
MAX_DELAY_MS = 5.0
MAX_QUEUE = 256
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_FILES = 64
DECODERS = 2
#: Seconds between two looks at ``filter.json`` by the command (0: never).
POLL_S = 5.0
#: The operator page served at ``/`` (package data next to this module).
PAGE_FILE = "serve_page.html"

_UPLOADER = re.compile(r"-1|0|[1-9][0-9]{0,17}")
_RAW_TYPES = ("application/octet-stream",)
_MULTIPART = "multipart/form-data"


# ---------------------------------------------------------------------------- the API's models


class ErrorDetail(BaseModel):
    """What went wrong: a stable code and one line for people."""

    code: str = Field(description="stable, machine-readable reason, e.g. bad_image")
    message: str


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


class CheckResult(BaseModel):
    """One image's decision (the columns of ``docl-flower filter check``)."""

    decision: Literal["block", "share"]
    predicted_owner: int = Field(description="user of the best autoencoder i*")
    predicted_class: int = Field(description="class of the best autoencoder i*")
    score: float | None = Field(description="d_{i*} (null when not finite)")
    interval: tuple[float | None, float | None] = Field(
        description="privacy interval of i* at the Guard's alpha (low null: one-sided)"
    )
    uploader: int
    filter_version: str = Field(description="SHA-256 of the filter.json that decided")


class BatchItem(BaseModel):
    """One file of a batch: its decision or its error."""

    index: int
    filename: str | None = None
    result: CheckResult | None = None
    error: ErrorDetail | None = None


class CheckBatchResponse(BaseModel):
    """One item per uploaded file, in upload order."""

    uploader: int
    results: list[BatchItem]


class FilterInfo(BaseModel):
    """The filter being served."""

    version: str
    autoencoders: int
    users: list[int]
    classes: list[int]
    extractor: str
    guard: str
    sided: str
    alpha: float
    max_alpha: float
    image_shape: list[int]
    kernel: str


class ReloadResponse(BaseModel):
    """What a reload did."""

    changed: bool = Field(description="whether filter.json's digest differs from before")
    previous_version: str
    filter: FilterInfo


class Decisions(BaseModel):
    """Images decided since the service started, by outcome."""

    block: int
    share: int
    error: int = Field(description="images answered with an error (unreadable, too large...)")


class Stats(BaseModel):
    """What the service has done so far."""

    decisions: Decisions
    queue_depth: int = Field(description="images admitted and not yet taken into a batch")


class Status(BaseModel):
    """Health and readiness."""

    status: str
    filter_version: str | None = None


# ---------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answer: HTTP status, code and message (and extra headers)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def detail(self) -> ErrorDetail:
        """The error as the API writes it."""
        return ErrorDetail(code=self.code, message=self.message)

    def response(self) -> JSONResponse:
        """The error as an HTTP answer."""
        body = ErrorResponse(error=self.detail()).model_dump()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _busy(code: str, message: str) -> ApiError:
    return ApiError(503, code, message, {"Retry-After": str(RETRY_AFTER_S)})


def parse_uploader(text: str) -> int:
    """A user id as the query writes it: a decimal integer >= -1 (-1: a third party)."""
    if not _UPLOADER.fullmatch(text):
        raise ApiError(
            422,
            "bad_uploader",
            f"uploader must be a user id (a decimal integer >= -1), got {text[:40]!r}",
        )
    return int(text)


# ---------------------------------------------------------------------------- metrics


class Metrics:
    """The service's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "docl_serve_request_seconds",
            "Time to answer a request",
            ["endpoint", "status"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.decisions = Counter(
            "docl_serve_decisions", "Images decided, by outcome", ["outcome"], registry=r
        )
        self.errors = Counter("docl_serve_errors", "Error answers, by code", ["code"], registry=r)
        self.batch = Histogram(
            "docl_serve_batch_size",
            "Images scored in one GlobalFilter.scores call",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.queue = Gauge(
            "docl_serve_queue_depth", "Images admitted and not yet taken into a batch", registry=r
        )
        self.autoencoders = Gauge(
            "docl_serve_filter_autoencoders", "Autoencoders in the served filter", registry=r
        )
        self.users = Gauge("docl_serve_filter_users", "Users in the served filter", registry=r)
        self.reloads = Counter(
            "docl_serve_reloads", "Filter reloads, by result", ["result"], registry=r
        )
        self.decided = dict.fromkeys(("block", "share", "error"), 0)
        for outcome in self.decided:
            self.decisions.labels(outcome)
        for result in ("ok", "failed"):
            self.reloads.labels(result)

    def decide(self, outcome: str) -> None:
        """Count one image decided (``block`` or ``share``) or answered with an error."""
        self.decisions.labels(outcome).inc()
        self.decided[outcome] += 1

    def show(self, loaded: LoadedFilter) -> None:
        """Set the filter gauges."""
        self.autoencoders.set(loaded.size)
        self.users.set(len(loaded.users))


class _Timing:
    """ASGI middleware: the latency histogram, labelled by route and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", None)
            self.metrics.latency.labels(route or "other", str(status)).observe(
                time.perf_counter() - start
            )


# ---------------------------------------------------------------------------- the service


@dataclass
class _Job:
    image: NDArray[np.uint8]
    uploader: int
    future: asyncio.Future[tuple[Decision, LoadedFilter]]


def _finite(x: float) -> float | None:
    return x if np.isfinite(x) else None


def _result(decision: Decision, loaded: LoadedFilter, uploader: int) -> CheckResult:
    return CheckResult(
        decision="block" if decision.block else "share",
        predicted_owner=decision.owner,
        predicted_class=decision.label,
        score=_finite(decision.score),
        interval=(_finite(decision.low), _finite(decision.high)),
        uploader=uploader,
        filter_version=loaded.version,
    )


def _info(loaded: LoadedFilter) -> FilterInfo:
    return FilterInfo(
        version=loaded.version,
        autoencoders=loaded.size,
        users=list(loaded.users),
        classes=list(loaded.classes),
        extractor=loaded.extractor,
        guard=loaded.guard_name,
        sided=loaded.guard.sided,
        alpha=loaded.alpha,
        max_alpha=loaded.max_alpha,
        image_shape=list(loaded.image_shape or ()),
        kernel=loaded.filter.kernel,
    )


def _version_on_disk(path: Path) -> str | None:
    """``integrity.sha256`` of a ``filter.json`` (None when unreadable)."""
    try:
        meta = json.loads(path.read_bytes())
        return str(meta["integrity"]["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Service:
    """The state behind the app: the current filter, the queue, the batcher, the decoders.

    Parameters are those of :func:`create_app`.
    """

    def __init__(
        self,
        filter_dir: Path,
        *,
        guard: str,
        alpha: float | None,
        token: str,
        max_batch: int,
        max_delay_ms: float,
        max_queue: int,
        max_body_bytes: int,
        max_files: int,
        decoders: int,
        poll_s: float,
        max_block_share: float = DEFAULT_MAX_BLOCK_SHARE,
        allow_unchecked: bool = False,
    ) -> None:
        if not 0.0 <= max_block_share <= 1.0:  # NaN fails here too
            raise ValueError(f"max_block_share must be in [0, 1], got {max_block_share}")
        for name, value in (
            ("max_batch", max_batch),
            ("max_queue", max_queue),
            ("max_body_bytes", max_body_bytes),
            ("max_files", max_files),
            ("decoders", decoders),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not max_delay_ms >= 0 or not poll_s >= 0:
            raise ValueError("max_delay_ms and poll_s must be >= 0")
        if not token:
            raise ValueError("the token must not be empty")
        self.folder = Path(filter_dir)
        self.guard_name = guard
        self.alpha = alpha
        self._token = token.encode("utf-8")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.max_body_bytes = max_body_bytes
        self.max_files = max_files
        self.poll_s = poll_s
        self.max_block_share = max_block_share
        self.allow_unchecked = allow_unchecked
        self.metrics = Metrics()
        self._stamp = file_stamp(self.folder / META_FILE)
        loaded = self._load()
        if loaded.image_shape is None:
            raise FilterError(f"{self.folder}: no dataset.image_shape in its config")
        self.loaded = loaded
        self.metrics.show(loaded)
        self._pending = 0
        self._closing = False
        self._queue: asyncio.Queue[_Job | None] | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._reload_lock: asyncio.Lock | None = None
        self._scorer = ThreadPoolExecutor(1, thread_name_prefix="docl-serve-score")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="docl-serve-load")
        self._decode_pool = ThreadPoolExecutor(decoders, thread_name_prefix="docl-serve-decode")
        self._decoders: queue.SimpleQueue[ImageDecoder] = queue.SimpleQueue()
        self._all_decoders = [ImageDecoder() for _ in range(decoders)]
        for d in self._all_decoders:
            self._decoders.put(d)
        self._tmp: Path | None = None

    # ------------------------------------------------------------------ life

    def _load(self) -> LoadedFilter:
        """Load and verify the folder (digests, HMAC, every autoencoder's probe record)."""
        loaded = load(self.folder, self.guard_name, self.alpha)
        failed = unvouched(loaded, self.max_block_share)
        if self.allow_unchecked:  # only records that are missing are let through
            failed = [f for f in failed if "no probe check recorded" not in f]
        if failed:
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise FilterError(
                f"{self.folder}: {len(failed)} of {loaded.size} autoencoders are not vouched "
                f"for by a probe check: {failed[0]}{more}"
            )
        return loaded

    @property
    def pending(self) -> int:
        """Images admitted and not yet taken into a batch."""
        return self._pending

    @property
    def ready(self) -> bool:
        """Whether requests are being decided (the batcher runs and no stop was asked)."""
        return self._batcher is not None and not self._batcher.done() and not self._closing

    async def start(self) -> None:
        """Start the batcher (and the poller when ``poll_s`` > 0), in the running loop."""
        self._tmp = Path(tempfile.mkdtemp(prefix="docl-serve-"))
        self._queue = asyncio.Queue()
        self._reload_lock = asyncio.Lock()
        self._batcher = asyncio.create_task(self._batch_loop(), name="docl-serve-batcher")
        if self.poll_s > 0:
            self._poller = asyncio.create_task(self._poll_loop(), name="docl-serve-poller")

    async def stop(self) -> None:
        """Refuse new work, let the batcher decide what is queued, end the workers."""
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._queue is not None and self._batcher is not None:
            self._queue.put_nowait(None)
            await self._batcher
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._close_workers)

    def _close_workers(self) -> None:
        self._decode_pool.shutdown(wait=True)
        self._scorer.shutdown(wait=True)
        self._loader.shutdown(wait=True)
        for d in self._all_decoders:
            d.close(wait=5.0)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------------ auth and admission

    def authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Raise 401 unless the request carries the bearer token."""
        given = credentials.credentials.encode("utf-8") if credentials is not None else b""
        if not hmac.compare_digest(given, self._token):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                {"WWW-Authenticate": "Bearer"},
            )

    def _admit(self, count: int) -> None:
        if self._closing or self._queue is None:
            raise _busy("not_running", "the service is starting or stopping")
        if self._pending + count > self.max_queue:
            raise _busy(
                "queue_full",
                f"{self._pending} images are waiting (at most {self.max_queue}); retry later",
            )
        self._pending += count
        self.metrics.queue.set(self._pending)

    def _release(self, count: int) -> None:
        self._pending -= count
        self.metrics.queue.set(self._pending)

    # ------------------------------------------------------------------ bodies

    async def _body(self, request: Request) -> AsyncGenerator[bytes, None]:
        """The request body in chunks; 413 as soon as it is larger than ``max_body_bytes``."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > self.max_body_bytes:
                raise self._too_large()
            yield chunk

    def _too_large(self) -> ApiError:
        return ApiError(
            413, "body_too_large", f"the body is larger than {self.max_body_bytes} bytes"
        )

    async def _files(self, request: Request, field: str, limit: int) -> list[tuple[str, bytes]]:
        """``(filename, bytes)`` of the multipart files named ``field`` (at most ``limit``)."""
        parser = MultiPartParser(
            request.headers,
            self._body(request),
            max_files=limit,
            max_fields=16,
            max_part_size=64 * 1024,
        )
        try:
            form = await parser.parse()
        except ApiError:
            raise
        except MultiPartException as err:
            raise ApiError(422, "bad_multipart", one_line(err)) from None
        except Exception as err:  # whatever python-multipart raises on a malformed body
            raise ApiError(
                422, "bad_multipart", f"malformed multipart body ({one_line(err)})"
            ) from None
        try:
            out = []
            for name, value in form.multi_items():
                if name == field and isinstance(value, UploadFile):
                    out.append((value.filename or "", await value.read()))
            return out
        finally:
            await form.close()

    async def _image_bytes(self, request: Request, kind: str) -> bytes:
        """The one image of a ``/v1/check`` request (raw body or multipart field ``image``)."""
        if kind == _MULTIPART:
            files = await self._files(request, "image", 1)
            if not files:
                raise ApiError(422, "bad_multipart", "no file in the multipart field 'image'")
            data = files[0][1]
        else:
            data = b"".join([chunk async for chunk in self._body(request)])
        if not data:
            raise ApiError(422, "empty_body", "no image bytes in the request")
        return data

    # ------------------------------------------------------------------ decoding

    def _decode_now(self, data: bytes, shape: tuple[int, ...]) -> NDArray[np.uint8]:
        """Decode ``data`` as ``filter check`` decodes a file (in a decoder worker process)."""
        assert self._tmp is not None
        decoder = self._decoders.get()
        try:
            fd, name = tempfile.mkstemp(dir=self._tmp, suffix=".upload")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                mode = "RGB" if len(shape) == 3 else "L"
                return decoder.decode(name, mode, (shape[0], shape[1]), formats=IMAGE_FORMATS)
            finally:
                os.unlink(name)
        finally:
            self._decoders.put(decoder)

    async def _decode(self, data: bytes) -> NDArray[np.uint8]:
        shape = self.loaded.image_shape
        assert shape is not None  # refused at load and at reload
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._decode_pool, self._decode_now, data, shape)
        except ImageReadError as err:
            raise ApiError(422, "bad_image", f"cannot read image ({one_line(err)})") from None
        except Exception as err:
            log.exception("decoding failed")
            raise ApiError(500, "decode_failed", one_line(err)) from None

    # ------------------------------------------------------------------ deciding

    async def check(self, request: Request, uploader: int) -> CheckResult:
        """Decide the one image of a ``/v1/check`` request."""
        assert self._queue is not None
        kind = _media_type(request)
        if not (kind == _MULTIPART or kind in _RAW_TYPES or kind.startswith("image/")):
            raise _unsupported(kind, "image/*, application/octet-stream or multipart/form-data")
        self._admit(1)
        owned = 1
        try:
            image = await self._decode(await self._image_bytes(request, kind))
            future: asyncio.Future[tuple[Decision, LoadedFilter]] = (
                asyncio.get_running_loop().create_future()
            )
            self._queue.put_nowait(_Job(image, uploader, future))
            owned = 0  # the batcher releases it
            decision, loaded = await future
        except ApiError:
            self.metrics.decide("error")
            raise
        finally:
            if owned:
                self._release(owned)
        self.metrics.decide(decision.decision)
        return _result(decision, loaded, uploader)

    async def check_batch(self, request: Request, uploader: int) -> CheckBatchResponse:
        """Decide every file of a ``/v1/check-batch`` request; one item each, in order."""
        assert self._queue is not None
        kind = _media_type(request)
        if kind != _MULTIPART:
            raise _unsupported(kind, "multipart/form-data")
        self._admit(1)
        owned = 1
        try:
            files = await self._files(request, "images", self.max_files)
            if not files:
                raise ApiError(422, "bad_multipart", "no file in the multipart field 'images'")
            self._admit(len(files) - 1)
            owned = len(files)

            async def decoded(data: bytes) -> NDArray[np.uint8]:
                if not data:
                    raise ApiError(422, "empty_body", "an empty file")
                return await self._decode(data)

            images = await asyncio.gather(
                *(decoded(data) for _, data in files), return_exceptions=True
            )
            loop = asyncio.get_running_loop()
            pending: list[asyncio.Future[tuple[Decision, LoadedFilter]] | ApiError] = []
            for image in images:
                owned -= 1
                if isinstance(image, BaseException):
                    self._release(1)
                    if not isinstance(image, ApiError):
                        raise image
                    pending.append(image)
                    continue
                future: asyncio.Future[tuple[Decision, LoadedFilter]] = loop.create_future()
                self._queue.put_nowait(_Job(image, uploader, future))  # the batcher releases it
                pending.append(future)
            items = []
            for i, ((filename, _), item) in enumerate(zip(files, pending, strict=True)):
                if isinstance(item, ApiError):
                    self.metrics.decide("error")
                    self.metrics.errors.labels(item.code).inc()
                    items.append(BatchItem(index=i, filename=filename, error=item.detail()))
                    continue
                decision, loaded = await item
                self.metrics.decide(decision.decision)
                result = _result(decision, loaded, uploader)
                items.append(BatchItem(index=i, filename=filename, result=result))
        finally:
            if owned:
                self._release(owned)
        return CheckBatchResponse(uploader=uploader, results=items)

    async def _batch_loop(self) -> None:
        """Take up to ``max_batch`` jobs (at most ``max_delay_ms`` after the first), score them."""
        assert self._queue is not None
        q = self._queue
        loop = asyncio.get_running_loop()
        while True:
            first = await q.get()
            if first is None:
                return
            jobs = [first]
            stop = False
            deadline = loop.time() + self.max_delay_s
            while len(jobs) < self.max_batch:
                try:
                    job = q.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(q.get(), left)
                    except TimeoutError:
                        break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            self._release(len(jobs))
            live = [j for j in jobs if not j.future.done()]  # a client that went away
            if live:
                await self._score(live)
            if stop:
                return

    async def _score(self, jobs: list[_Job]) -> None:
        loaded = self.loaded  # this batch is decided by this filter, whatever a reload does
        images = np.stack([j.image for j in jobs])
        uploaders = [j.uploader for j in jobs]
        self.metrics.batch.observe(len(jobs))
        loop = asyncio.get_running_loop()
        try:
            decided = await loop.run_in_executor(self._scorer, decide, loaded, images, uploaders)
        except Exception as err:
            log.exception("scoring a batch of %d images failed", len(jobs))
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(ApiError(500, "scoring_failed", one_line(err)))
            return
        for j, d in zip(jobs, decided, strict=True):
            if not j.future.done():
                j.future.set_result((d, loaded))

    # ------------------------------------------------------------------ reloading

    async def reload(self) -> ReloadResponse:
        """Load the folder again and swap it in; ApiError (old filter kept) when it fails."""
        assert self._reload_lock is not None
        async with self._reload_lock:
            old = self.loaded
            stamp = file_stamp(self.folder / META_FILE)
            loop = asyncio.get_running_loop()
            try:
                new = await loop.run_in_executor(self._loader, self._load)
            except Exception as err:  # FilterError, ValueError, an extractor that fails to build
                self.metrics.reloads.labels("failed").inc()
                raise ApiError(422, "filter_invalid", one_line(err)) from None
            finally:
                self._stamp = stamp
            if new.image_shape != old.image_shape:
                self.metrics.reloads.labels("failed").inc()
                raise ApiError(
                    409,
                    "filter_incompatible",
                    f"the new filter reads images of shape {list(new.image_shape or [])}, this "
                    f"service {list(old.image_shape or [])}: restart the service to serve it",
                )
            self.loaded = new  # one reference: batches already taken finish on the old one
            self.metrics.reloads.labels("ok").inc()
            self.metrics.show(new)
            if new.version != old.version:
                log.info(
                    "filter reloaded: %s -> %s (%d autoencoders, %d users)",
                    old.version[:12],
                    new.version[:12],
                    new.size,
                    len(new.users),
                )
            return ReloadResponse(
                changed=new.version != old.version, previous_version=old.version, filter=_info(new)
            )

    async def _poll_loop(self) -> None:
        """Reload when ``filter.json`` was replaced by a filter of another digest."""
        path = self.folder / META_FILE
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.poll_s)
            stamp = file_stamp(path)
            if stamp is None or stamp == self._stamp:
                continue
            version = await loop.run_in_executor(self._loader, _version_on_disk, path)
            if version is not None and version == self.loaded.version:
                self._stamp = stamp
                continue
            try:
                await self.reload()
            except ApiError as err:
                log.warning("filter changed on disk but was not reloaded: %s", err.message)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _unsupported(kind: str, wanted: str) -> ApiError:
    return ApiError(415, "unsupported_media_type", f"content type {kind[:60]!r}: send {wanted}")


# ---------------------------------------------------------------------------- the app


def _csp_hash(text: str) -> str:
    digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
    return f"'sha256-{digest}'"


@functools.cache
def operator_page() -> tuple[str, str]:
    """The operator page and its Content-Security-Policy.

    The page's inline ``<script>`` and ``<style>`` are allowed by their SHA-256 hashes (the page
    never changes while the process runs, so no per-response nonce is needed); everything else
    is refused but requests to this origin (``connect-src 'self'``) and the preview of the
    picked image (a ``blob:`` URL made in the page).
    """
    html = resources.files("docl_flower.operations").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, re.S)
    policy = {
        "default-src": "'none'",
        "script-src": " ".join(map(_csp_hash, scripts)),
        "style-src": " ".join(map(_csp_hash, styles)),
        "img-src": "blob:",
        "connect-src": "'self'",
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    return html, "; ".join(f"{k} {v}" for k, v in policy.items())


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    422: {"model": ErrorResponse, "description": "bad uploader id, body or image"},
}
_UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    413: {"model": ErrorResponse, "description": "body larger than the limit"},
    415: {"model": ErrorResponse, "description": "unsupported content type"},
    503: {"model": ErrorResponse, "description": "queue full or stopping (see Retry-After)"},
}
_BINARY = {"type": "string", "format": "binary"}
_CHECK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": _BINARY},
            "application/octet-stream": {"schema": _BINARY},
            _MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {"image": _BINARY},
                    "required": ["image"],
                }
            },
        },
    }
}
_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            _MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {"images": {"type": "array", "items": _BINARY}},
                    "required": ["images"],
                }
            }
        },
    }
}
_UPLOADER_QUERY = Query(description="user id of the uploader (-1: a third party)")


def create_app(
    filter_dir: Path | str,
    *,
    token: str,
    guard: str = "paper",
    alpha: float | None = None,
    max_batch: int = MAX_BATCH,
    max_delay_ms: float = MAX_DELAY_MS,
    max_queue: int = MAX_QUEUE,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_files: int = MAX_FILES,
    decoders: int = DECODERS,
    poll_s: float = 0.0,
    max_block_share: float = DEFAULT_MAX_BLOCK_SHARE,
    allow_unchecked: bool = False,
) -> FastAPI:
    """The upload service for the filter in ``filter_dir`` (loaded and verified now).

    Parameters
    ----------
    filter_dir : Path or str
        A filter folder written by a run.
    token : str
        The bearer token every ``/v1`` request must carry.
    guard, alpha
        As for ``docl-flower filter check`` (alpha None: the filter's own).
    max_batch : int
        Most images scored in one call.
    max_delay_ms : float
        Longest wait for more images after the first of a batch.
    max_queue : int
        Most images admitted and not yet taken into a batch; more get 503.
    max_body_bytes : int
        Largest request body (413 above).
    max_files : int
        Most files in one ``/v1/check-batch`` request.
    decoders : int
        Decoder worker processes (and threads that feed them).
    poll_s : float
        Seconds between two looks at ``filter.json`` for a new digest (0: never).
    max_block_share : float
        Every autoencoder served must carry the run's probe record, showing that the region
        a Guard up to the served alpha can block held at most this share of the probe's
        harmless (and noise) images; a filter (or reload) with one that does not is refused.
    allow_unchecked : bool
        Serve autoencoders that carry no probe record (filters saved before the records, or
        built by hand); a record that fails is still refused.

    Raises
    ------
    FilterError, ValueError
        The filter cannot be served, or a setting is out of range.
    """
    if guard not in GUARDS:
        raise ValueError(f"unknown guard {guard!r}; choose one of {sorted(GUARDS)}")
    service = Service(
        Path(filter_dir),
        guard=guard,
        alpha=alpha,
        token=token,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        max_files=max_files,
        decoders=decoders,
        poll_s=poll_s,
        max_block_share=max_block_share,
        allow_unchecked=allow_unchecked,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="docl-flower upload service",
        version="1",
        description="Block or share uploaded images with a saved DOCL filter.",
        lifespan=lifespan,
    )
    app.state.service = service
    bearer = HTTPBearer(auto_error=False)

    def authorized(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        service.authorize(credentials)

    guarded = [Depends(authorized)]

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: Exception) -> Response:
        assert isinstance(err, ApiError)
        service.metrics.errors.labels(err.code).inc()
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: Exception) -> Response:
        assert isinstance(err, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return ApiError(
            err.status_code,
            code or f"http_{err.status_code}",
            str(err.detail),
            dict(err.headers or {}),
        ).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: Exception) -> Response:
        assert isinstance(err, RequestValidationError)
        problems = list(err.errors())
        where = [tuple(p.get("loc", ())) for p in problems]
        code = "bad_uploader" if ("query", "uploader") in where else "bad_request"
        text = "; ".join(
            f"{'.'.join(map(str, p.get('loc', ())))}: {p.get('msg', '')}" for p in problems
        )
        service.metrics.errors.labels(code).inc()
        return ApiError(422, code, text or "invalid request").response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> Response:
        log.error("unhandled error", exc_info=err)
        return ApiError(500, "internal", "internal error (see the server's log)").response()

    @app.post(
        "/v1/check",
        response_model=CheckResult,
        responses=_UPLOAD_ERRORS,
        dependencies=guarded,
        openapi_extra=_CHECK_BODY,
        summary="Decide one image",
    )
    async def check(request: Request, uploader: str = _UPLOADER_QUERY) -> CheckResult:
        return await service.check(request, parse_uploader(uploader))

    @app.post(
        "/v1/check-batch",
        response_model=CheckBatchResponse,
        responses=_UPLOAD_ERRORS,
        dependencies=guarded,
        openapi_extra=_BATCH_BODY,
        summary="Decide several images (multipart field 'images')",
    )
    async def check_batch(request: Request, uploader: str = _UPLOADER_QUERY) -> CheckBatchResponse:
        return await service.check_batch(request, parse_uploader(uploader))

    @app.get(
        "/v1/filter",
        response_model=FilterInfo,
        responses={401: _ERRORS[401]},
        dependencies=guarded,
        summary="The filter being served",
    )
    async def filter_info() -> FilterInfo:
        return _info(service.loaded)

    @app.get(
        "/v1/stats",
        response_model=Stats,
        responses={401: _ERRORS[401]},
        dependencies=guarded,
        summary="Images decided so far, by outcome",
    )
    async def stats() -> Stats:
        return Stats(decisions=Decisions(**service.metrics.decided), queue_depth=service.pending)

    @app.post(
        "/v1/reload",
        response_model=ReloadResponse,
        responses={
            **_ERRORS,
            409: {"model": ErrorResponse, "description": "the new filter needs another image size"},
            422: {"model": ErrorResponse, "description": "the folder holds no usable filter"},
        },
        dependencies=guarded,
        summary="Read the filter folder again and swap it in",
    )
    async def reload() -> ReloadResponse:
        return await service.reload()

    page, policy = operator_page()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def operator() -> HTMLResponse:
        headers = {
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        }
        return HTMLResponse(page, headers=headers)

    @app.get("/healthz", response_model=Status, summary="The process is alive")
    async def healthz() -> Status:
        return Status(status="ok")

    @app.get(
        "/readyz",
        response_model=Status,
        responses={503: {"model": ErrorResponse, "description": "not deciding requests"}},
        summary="A filter is loaded and requests are decided",
    )
    async def readyz() -> Status:
        if not service.ready:
            raise _busy("not_ready", "the service is starting or stopping")
        return Status(status="ready", filter_version=service.loaded.version)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Timing, metrics=service.metrics)
    return app


# ---------------------------------------------------------------------------- the command


def default_token_path() -> Path:
    """``serve.token`` next to the filter key (see ``filter_key_path``)."""
    return filter_key_path().parent / TOKEN_FILE


def read_token(path: Path) -> str:
    """The bearer token in ``path``, created (32 random bytes, mode 0600) when missing.

    Raises ``ValueError`` for a token file that cannot be created or read, or whose token is
    shorter than :data:`MIN_TOKEN_CHARS` or not printable ASCII.
    """
    try:
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            token = secrets.token_urlsafe(32)
            if create_file_atomic(path, (token + "\n").encode("ascii"), mode=0o600):
                log.info("created the token file %s", path)
        text = path.read_text(encoding="utf-8").strip()
        mode = stat.S_IMODE(path.stat().st_mode)
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read or create the token file ({one_line(err)})") from err
    if len(text) < MIN_TOKEN_CHARS or not all(33 <= ord(c) < 127 for c in text):
        raise ValueError(
            f"{path}: the token must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
            "without spaces"
        )
    if mode & 0o077:
        log.warning("token file %s is readable by other users (chmod 600 it)", path)
    return text


def _number(kind: type[int] | type[float], low: float, high: float = math.inf) -> Any:
    """Argparse type: an int or a finite float in ``[low, high]``."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(
                f"must be a number in [{low:g}, {high:g}], got {text!r}"
            )
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "filter", type=filter_folder, help="folder written by a run (RUN_DIR/filter)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=_number(int, 1, 65535), default=8080)
    parser.add_argument("--alpha", type=alpha_type, default=None, help="as for filter check")
    parser.add_argument("--guard", choices=sorted(GUARDS), default="paper")
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=f"bearer token file (default: {TOKEN_FILE} next to the filter key; created)",
    )
    parser.add_argument("--max-batch", type=_number(int, 1), default=MAX_BATCH)
    parser.add_argument("--max-delay-ms", type=_number(float, 0), default=MAX_DELAY_MS)
    parser.add_argument("--max-queue", type=_number(int, 1), default=MAX_QUEUE)
    parser.add_argument("--max-body-bytes", type=_number(int, 1), default=MAX_BODY_BYTES)
    parser.add_argument("--max-files", type=_number(int, 1), default=MAX_FILES)
    parser.add_argument("--decoders", type=_number(int, 1), default=DECODERS)
    parser.add_argument(
        "--poll-s", type=_number(float, 0), default=POLL_S, help="filter.json check period (0: off)"
    )
    parser.add_argument(
        "--max-block-share",
        type=_number(float, 0, 1),
        default=DEFAULT_MAX_BLOCK_SHARE,
        help="largest probe share an autoencoder's saved probe check may show (else refused)",
    )
    parser.add_argument(
        "--allow-unchecked",
        action="store_true",
        help="serve autoencoders saved without a probe record (older filters)",
    )
    parser.add_argument(
        "--max-connections", type=_number(int, 1), default=256, help="open connections (503 above)"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=_number(float, 0),
        default=30.0,
        help="seconds SIGTERM waits for requests in flight",
    )
    parser.add_argument("--certfile", type=Path, default=None, help="TLS certificate (PEM)")
    parser.add_argument("--keyfile", type=Path, default=None, help="TLS private key (PEM)")
    return parser


def _keep_running(signum: int, _frame: FrameType | None) -> None:
    """Handler that uvicorn restores and raises again after its graceful stop: nothing left."""


def main(argv: Sequence[str]) -> int:
    """Entry point of ``docl-flower filter serve``; returns the exit code."""
    import uvicorn

    parser = _parser()
    args = parser.parse_args(list(argv))
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    try:
        token_path = args.token_file or default_token_path()
        token = read_token(token_path)
        app = create_app(
            args.filter,
            token=token,
            guard=args.guard,
            alpha=args.alpha,
            max_batch=args.max_batch,
            max_delay_ms=args.max_delay_ms,
            max_queue=args.max_queue,
            max_body_bytes=args.max_body_bytes,
            max_files=args.max_files,
            decoders=args.decoders,
            poll_s=args.poll_s,
            max_block_share=args.max_block_share,
            allow_unchecked=args.allow_unchecked,
        )
    except (FilterError, ValueError) as err:
        print(f"{PROG}: {one_line(err)}", file=sys.stderr)
        return 2
    tls = args.certfile is not None
    if not tls and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without TLS: the token and images travel in clear", args.host)
    log.info("token file: %s (send Authorization: Bearer <its content>)", token_path)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=str(args.certfile) if tls else None,
        ssl_keyfile=str(args.keyfile) if tls else None,
        limit_concurrency=args.max_connections,
        timeout_graceful_shutdown=args.shutdown_timeout,
        server_header=False,
        log_level="info",
    )
    server = uvicorn.Server(config)
    # uvicorn catches SIGINT/SIGTERM while it runs, stops gracefully, then raises the signal
    # again for the handler it found: this one, so that a requested stop exits 0.
    before = {s: signal.signal(s, _keep_running) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    return 0 if server.started else 1
