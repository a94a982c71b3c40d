"""The HTTP server: raw images in, labels out, on onnxruntime, following a registry alias.

`visiontune serve` builds the app with `create_app` and runs it under uvicorn: request parsing
and its 4xx answers, the response schemas (OpenAPI at /docs), /metrics and the page at /. The
model, the thread pools and the registry follower are in model_server.py; the event loop only
moves bytes. Imported, never run.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from visiontune.components import images
from visiontune.components.config import ServeConfig
from visiontune.components.errors import VisiontuneError

from .model_server import Metrics, ServeError, Server

MiB = 1 << 20
PATHS = frozenset(
    {
        "/",
        "/v1/predict",
        "/v1/model",
        "/v1/drift",
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/openapi.json",
    }
)


# ---------------------------------------------------------------------------------------------
# Metrics per request


class MetricsMiddleware:
    """Counts every response by path and status and times it (pure ASGI: no per-request task)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in PATHS else "other"
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Request and response schemas


class ErrorBody(BaseModel):
    error: str = Field(description="A short code, e.g. undecodable_image, upload_too_large")
    detail: str = Field(description="What is wrong with the request and how to fix it")


class Label(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    image: str = Field(description="The upload's file name, or 'body' for a raw image body")
    label: str
    confidence: float
    top_k: list[Label]


class ServedBy(BaseModel):
    name: str
    version: str | None = Field(description="Registry version; null for a model file")
    run_id: str | None


class PredictResponse(BaseModel):
    model: ServedBy
    predictions: list[ImagePrediction]


class ModelInfo(BaseModel):
    name: str
    version: str | None
    alias: str | None
    source: str = Field(description="The file, or models:/NAME/VERSION, this model was loaded from")
    following: str | None = Field(description="models:/NAME@ALIAS polled for new versions, if any")
    run_id: str | None
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    provider: str = Field(description="The onnxruntime execution provider, e.g. CPUExecutionProvider")
    lineage: dict[str, str]
    metrics: dict[str, float] = Field(description="The run's logged metrics (test metrics)")
    promotion: dict[str, str] = Field(description="The promotion decision recorded on the version")
    loaded_at: str
    max_batch: int


class Status(BaseModel):
    status: str
    version: str | None = None
    detail: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Empty body, malformed multipart, no image, or more than serve.max_images images",
        413: "Body over serve.max_upload_mb, an image over validate.max_pixels, or one whose decode alone "
        "needs more than serve.max_decode_mb",
        415: "Content-Type is neither multipart/form-data nor image/*, or an image format other than JPEG, "
        "PNG, WebP, BMP or TIFF",
        422: "An image that cannot be decoded (not an image, truncated, empty), or a bad parameter",
        503: "No model is loaded yet",
    }.items()
}

REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                "description": "One or more image files (any field name)",
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary", "description": "One encoded image"}},
    },
}


async def _read_body(request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServeError(400, "bad_content_length", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise ServeError(
                413,
                "upload_too_large",
                f"the body is {int(declared) / MiB:.1f} MiB, over serve.max_upload_mb={limit / MiB:g}; "
                "send fewer or smaller images",
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(
                413,
                "upload_too_large",
                f"the body passed serve.max_upload_mb={limit / MiB:g}; send fewer or smaller images",
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_images(request, cfg: ServeConfig) -> list[tuple[str, bytes]]:
    """(name, bytes) of each image in a multipart form, or of the one raw image body."""
    content_type = request.headers.get("content-type", "")
    kind = parse_options_header(content_type)[0].decode("latin-1").lower()
    if kind != "multipart/form-data" and not kind.startswith("image/"):
        raise ServeError(
            415,
            "unsupported_media_type",
            f"Content-Type {content_type or '(none)'!r}: send multipart/form-data with image files, "
            "or one image as the body with Content-Type image/jpeg, image/png, ...",
        )
    body = await _read_body(request, int(cfg.max_upload_mb * MiB))
    if not body:
        raise ServeError(400, "empty_body", "the request body is empty; send an image")
    if kind.startswith("image/"):
        return [("body", body)]

    async def chunks():
        yield body

    parser = MultiPartParser(request.headers, chunks(), max_files=cfg.max_images + 1, max_fields=100)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "Too many files" in exc.message:
            raise ServeError(
                400,
                "too_many_images",
                f"more than serve.max_images={cfg.max_images} images in one request; "
                "split them over several requests",
            ) from None
        raise ServeError(400, "bad_multipart", f"malformed multipart body: {exc.message}") from None
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise ServeError(400, "no_image", "the form holds no file; send images as file fields")
        if len(files) > cfg.max_images:
            raise ServeError(
                400,
                "too_many_images",
                f"{len(files)} images, over serve.max_images={cfg.max_images}; "
                "split them over several requests",
            )
        return [(f.filename or f"image {i + 1}", await f.read()) for i, f in enumerate(files)]
    finally:
        await form.close()


TOKEN_ENV = "VISIONTUNE_SERVE_TOKEN"
OPEN_PATHS = ("/healthz", "/readyz", "/", "/docs", "/openapi.json", "/docs/oauth2-redirect")


MIN_TOKEN_CHARS = 16
_NEW_TOKEN = f"e.g. `export {TOKEN_ENV}=$(openssl rand -hex 32)`"


def serve_token(cfg: ServeConfig) -> str | None:
    """The bearer token clients must send: $VISIONTUNE_SERVE_TOKEN, else serve.token, else none; trimmed
    of the spaces and newlines a copy or a file adds (clients' headers cannot carry them), and at least
    MIN_TOKEN_CHARS long. Binding to anything but loopback without one is refused: the model would be
    open to anyone."""
    token = (os.environ.get(TOKEN_ENV) or cfg.token or "").strip()
    if not token and not _loopback(cfg.host):
        raise VisiontuneError(
            f"serve.host={cfg.host} exposes the server beyond this machine, so it needs a token: set "
            f"{TOKEN_ENV} (or serve.token) to a long random secret, {_NEW_TOKEN}; clients then send "
            "`Authorization: Bearer <token>`"
        )
    if token and len(token) < MIN_TOKEN_CHARS:
        source = TOKEN_ENV if os.environ.get(TOKEN_ENV) else "serve.token"
        raise VisiontuneError(
            f"{source} is too short ({len(token)} of at least {MIN_TOKEN_CHARS} characters) to resist "
            f"guessing: generate a token, {_NEW_TOKEN}"
        )
    return token or None


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class TokenMiddleware:
    """401 for a request to anything but the health checks, the page and the API docs without
    `Authorization: Bearer <token>` (compared in constant time); the model is never reached."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token):
            return await self.app(scope, receive, send)
        detail = "missing or wrong bearer token: send `Authorization: Bearer <token>`"
        response = JSONResponse(
            ErrorBody(error="unauthorized", detail=detail).model_dump(),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# The app


def create_app(cfg: ServeConfig, max_pixels: int = images.DEFAULT_MAX_PIXELS, server: Server | None = None):
    """The FastAPI app; the model is loaded (and warmed up) before this returns. Off loopback it
    refuses to start without a token (serve_token)."""
    token = serve_token(cfg)
    server = server or Server(cfg, max_pixels)
    if server.current is None:
        server.load()

    @asynccontextmanager
    async def lifespan(_app):
        server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(
        title="visiontune",
        summary="Image classification with an exported visiontune model: raw images in, labels out.",
        version="1",
        lifespan=lifespan,
    )
    app.state.server = server
    if token:
        app.add_middleware(TokenMiddleware, token=token)
    app.add_middleware(MetricsMiddleware, metrics=server.metrics)  # added last: counts the 401s too

    def error(status: int, code: str, detail: str) -> JSONResponse:
        return JSONResponse(ErrorBody(error=code, detail=detail).model_dump(), status_code=status)

    @app.exception_handler(ServeError)
    async def _serve_error(_request, exc: ServeError):
        return error(exc.status, exc.code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(_request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error(422, "invalid_parameter", "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        return error(exc.status_code, "http_error", str(exc.detail))

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses=ERRORS,
        openapi_extra={"requestBody": REQUEST_BODY},
        summary="Classify one or more images",
    )
    async def predict(
        request: Request,
        top_k: int | None = Query(None, ge=1, le=1000, description="Labels per image (default serve.top_k)"),
    ):
        """Multipart uploads (one or more files) or one raw image body (Content-Type image/*)."""
        model = server.current  # one reference for the whole request: a swap never mixes versions
        if model is None:
            raise ServeError(503, "not_ready", "no model is loaded yet; retry when /readyz answers 200")
        uploads = await _read_images(request, cfg)
        loop = asyncio.get_running_loop()
        size = model.classifier.size
        decoded = await asyncio.gather(
            *(
                loop.run_in_executor(server.decode_pool, server.decode, data, name, size)
                for name, data in uploads
            ),
            return_exceptions=True,
        )
        for result in decoded:
            if isinstance(result, BaseException):
                raise result
        logits = await server.infer(model, np.stack(decoded))
        server.metrics.images.labels(model.version or "").inc(len(uploads))
        ranked = model.classifier.rank(logits, top_k or cfg.top_k)
        return {
            "model": {"name": model.name, "version": model.version, "run_id": model.run_id},
            "predictions": [{"image": name, **r} for (name, _), r in zip(uploads, ranked, strict=True)],
        }

    @app.get("/v1/model", response_model=ModelInfo, responses={503: ERRORS[503]}, summary="The model served")
    async def model_info():
        model = server.current
        if model is None:
            raise ServeError(503, "not_ready", "no model is loaded yet")
        c = model.classifier
        return ModelInfo(
            name=model.name,
            version=model.version,
            alias=model.alias,
            source=model.source,
            following=server.ref.uri if server.ref.alias else None,
            run_id=model.run_id,
            classes=c.class_names,
            image_size=c.size,
            mean=c.mean,
            std=c.std,
            provider=c.provider,
            lineage=model.lineage,
            metrics=model.metrics,
            promotion=model.promotion,
            loaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(model.loaded_at)),
            max_batch=cfg.max_batch,
        )

    @app.get("/v1/drift", summary="Drift windows of the served traffic against the model's reference")
    async def drift_state():
        """The latest windows of serve.drift_window images, newest first, each tested against the
        served version's val-split reference (p-values, statistics, effect sizes, the flag)."""
        model = server.current
        if model is None:
            raise ServeError(503, "not_ready", "no model is loaded yet")
        if model.monitor is None:
            reason = (
                "serve.drift_window is 0"
                if cfg.drift_window == 0
                else "the model has no embedding output or drift reference: export it again"
            )
            return {"enabled": False, "version": model.version, "reason": reason, "windows": []}
        return model.monitor.state()

    @app.get("/healthz", response_model=Status, summary="The process is alive")
    async def healthz():
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses={503: {"model": Status}}, summary="Ready to answer")
    async def readyz():
        model = server.current
        if model is None:
            return JSONResponse(Status(status="loading", detail="no model loaded").model_dump(), 503)
        return Status(status="ready", version=model.version)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE)

    return app


def describe(server: Server, host: str, port: int) -> str:
    """The startup line: what is served, on which provider, where."""
    m = server.current
    what = f"{m.name} v{m.version}" if m.version else m.source
    follow = f", following {server.ref.uri} every {server.cfg.poll_s:g} s" if server.ref.alias else ""
    batching = (
        f"dynamic batching up to {server.cfg.max_batch} images / {server.cfg.max_wait_ms:g} ms"
        if server.cfg.max_batch > 1
        else "no dynamic batching"
    )
    return (
        f"serving {what} ({len(m.classifier.class_names)} classes, {m.classifier.size} px) on "
        f"{m.classifier.provider}{follow}; {batching}\n"
        f"  http://{host}:{port}/  (page)   /v1/predict   /v1/model   /docs   /metrics"
    )


PAGE = (Path(__file__).parent / "serve_page.html").read_text()  # inline CSS and JS: works offline
