"""The HTTP API around an `LCMGenerator` (FastAPI): `POST /v1/images`, `GET /v1/config`, `/health`, `/metrics`, and
the page at `/`. OpenAPI description at `/openapi.json`.

Every request a client can get wrong is answered with a 4xx and a one-line `{"error": ...}`: 413 for a body over the
limit, 415 for a body not sent as JSON (content-type) or compressed (content-encoding), 422 for anything invalid (malformed JSON or JSON Python cannot read, a
key given twice, a value of the wrong JSON type, a field out of range, a size the model cannot make, an upload that is
not an image), 429 when the queue is full; 404 and 405 come in the same shape (a route's path with a trailing slash too,
`not_found`). Every GET route answers HEAD too (a proxy's health check). A request holds its place in the queue from
the moment it is admitted (`Batcher.place`): a full queue answers 429 before an upload is decoded. A client that goes
away while its request waits (to be decoded, or in the queue) is dropped: its image is not made. A failure that is no
client's mistake is a 500 in the same shape, its traceback logged, on a connection that stays open (`Guard`). Once the
server stops, a body still arriving is answered 503 after a short wait (`Uploads`); requests whose body has arrived are
made to the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from importlib import resources

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.datastructures import URL
from starlette.exceptions import HTTPException

from latent_consistency import __version__
from latent_consistency.errors import UserError
from latent_consistency.grids import to_pil
from latent_consistency.pipelines import LCMGenerator, repeated_seed_note
from latent_consistency.prompts import truncated_prompts, utf8_error
from latent_consistency.serve.batcher import Batcher, QueueFull
from latent_consistency.serve.metrics import Metrics
from latent_consistency.serve.request import MAX_STEPS, ImageRequest, Job, Limits, prepare

IMAGE_PATH = "/v1/images"
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
DISCONNECT_POLL_S = 0.05
# Init images decoded at once: one of 64 Mpx (a 200 kB PNG) takes ~250 MB and a second, before its request queues
MAX_DECODING = 2
SHUTTING_DOWN = "the server is shutting down; send the request again once it is back"
INTERNAL = "internal error ({}); the server's log has the details"
OUT_OF_MEMORY = "the server's device ran out of memory for this image: ask a smaller width and height, or fewer images at once"
UPLOAD_GRACE_S = 3.0  # once the server stops, how long a request body still arriving may take before it is answered 503

logger = logging.getLogger("latent_consistency.serve")


def run_jobs(generator: LCMGenerator, jobs: list[Job]) -> list[tuple[bytes, int, tuple | None, tuple | None]]:
    """One forward pass for jobs that share a key: (encoded image, batch size, `truncated_prompts` entry of its prompt and of
    its negative prompt, each None when it is read whole) per job.

    Only this worker thread touches the model, its tokenizers included: a tokenizer keeps its truncation and padding as
    state, so a call from the event loop in the middle of the worker's would leave the worker's prompts untruncated."""
    first = jobs[0]
    options = {}
    if first.gamma is not None:
        options["gamma"] = first.gamma
    if first.init_image is not None:
        options |= {"init_images": torch.stack([job.init_image for job in jobs]), "strength": first.strength}
    if first.negative_prompt is not None:
        options["negative_prompts"] = [job.negative_prompt for job in jobs]
        if first.negative_scale is not None:
            options["negative_scale"] = first.negative_scale
    timesteps = generator.timesteps(first.steps, strength=first.strength)  # strength is 1 without an init image
    images = generator([job.prompt for job in jobs], timesteps, first.guidance_scale, [job.seed for job in jobs], first.height,
                       first.width, **options)
    if not torch.isfinite(images.float()).all():  # NaN pixels would be sent as a black image (uint8 0); a model fault, a 500
        raise RuntimeError("the model made NaN or infinite pixels (its weights may hold NaN, or its dtype overflowed); no image sent")
    long = truncations(generator, [job.prompt for job in jobs])
    long_negative = truncations(generator, options.get("negative_prompts", []))
    return [(encode(image, job.format), len(jobs), long.get(i), long_negative.get(i))
            for i, (image, job) in enumerate(zip(to_pil(images), jobs))]


def truncations(generator: LCMGenerator, prompts: list[str]) -> dict[int, tuple[int, int]]:
    """{index: (tokens, the most the text encoder reads)} of the prompts it truncates (`truncated_prompts`)."""
    return {i: (tokens, limit) for i, tokens, limit in truncated_prompts(generator.model.prompts, prompts)} if prompts else {}


def encode(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92) if fmt == "jpeg" else image.save(buffer, format="PNG")
    return buffer.getvalue()


class ErrorAnswer(BaseModel):
    """Every refusal's body (4xx, 500, 503), as /openapi.json describes it."""

    error: str = Field(description="what is wrong, in one line")


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def parse_json(body: bytes):
    """The JSON body as Python values; every way it cannot be read is a `json.JSONDecodeError` saying why (FastAPI answers
    those as invalid JSON, anything else as a bare 400): a key given twice (json.loads keeps the last silently), text
    that is not UTF-8, nesting deeper than the parser recurses, an integer over Python's 4300 digits."""

    def once_each(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise json.JSONDecodeError(f'the key "{key}" is given twice', "", 0)
            seen.add(key)
        return dict(pairs)

    try:
        return json.loads(body, object_pairs_hook=once_each)
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError:
        raise json.JSONDecodeError("it is not UTF-8 text", "", 0) from None
    except RecursionError:
        raise json.JSONDecodeError("it is nested too deeply", "", 0) from None
    except ValueError as err:  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
        raise json.JSONDecodeError(str(err).split(":")[0], "", 0) from None


class JSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """A route whose JSON body is read by `parse_json`."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def with_json_request(request: Request) -> Response:
            return await handler(JSONRequest(request.scope, request.receive))

        return with_json_request


def replayed(body: bytes, receive):
    """An ASGI receive that gives the app the body already read, then passes on the client's disconnect."""
    sent = False

    async def receive_again():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_again


class UploadsClosed(Exception):
    """The server stopped taking request bodies (`Uploads`)."""


class Uploads:
    """Whether the server still takes request bodies: until `close` (as a stop begins), and `grace_s` after it.

    A graceful stop (uvicorn's, at the first Ctrl-C or SIGTERM) waits for every open request, and a client stalled in its
    upload would hold it for ever. A request whose body has not arrived has cost the server nothing yet, so it gets a short
    bounded wait and then a 503; one whose body has arrived (decoded, queued or generating) is made to the end."""

    def __init__(self, grace_s: float = UPLOAD_GRACE_S):
        self.grace_s, self.deadline = grace_s, None

    def close(self) -> None:
        """Take no body after `grace_s` from now (the first call's; a stop begins once)."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace_s

    def closed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


class Guard:
    """ASGI middleware: refuses bodies over the limit with 413 (read before the app sees them), answers 503 to a body
    still arriving when the server stops taking them (`Uploads`), answers an unexpected exception with a one-line 500 and
    logs its traceback, and counts the image requests' responses by status, with the latency of the successful ones.

    The 500 ends the exception here: let through, Starlette's ServerErrorMiddleware raised it on after its response, and
    uvicorn then closed the connection without a `Connection: close`, so a client's pool reused a dead connection for its
    next request (a `ReadError`)."""

    def __init__(self, app, max_body_bytes: int, max_upload_bytes: int, metrics: Metrics, uploads: Uploads):
        self.app, self.max_body_bytes, self.max_upload_bytes = app, max_body_bytes, max_upload_bytes
        self.metrics, self.uploads = metrics, uploads

    async def receive_upload(self, receive):
        """The client's next message; `UploadsClosed` once the server takes no more bodies (looked at every
        `DISCONNECT_POLL_S` while the message is awaited)."""
        arriving = asyncio.ensure_future(receive())
        try:
            while not (await asyncio.wait({arriving}, timeout=DISCONNECT_POLL_S))[0]:
                if self.uploads.closed():
                    raise UploadsClosed
            return arriving.result()
        finally:  # closed, or a forced stop cancelling this request: the message is awaited no longer
            arriving.cancel()

    async def read_body(self, receive) -> bytes | None | bool:
        """The whole body; None once it passes the limit; False if the client disconnected; `UploadsClosed` once the
        server takes no more bodies."""
        body, more = bytearray(), True
        while more:
            message = await self.receive_upload(receive)
            if message["type"] == "http.disconnect":
                return False
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return None
        return bytes(body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, started = time.perf_counter(), [500], []  # 500 until a response starts

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started.append(True)
            await send(message)

        if scope["method"] == "HEAD":  # a proxy's health check: a GET route answers HEAD with its status and headers (RFC 9110)
            scope, send_counted = dict(scope, method="GET"), headers_only(send_counted)
        coding = dict(scope["headers"]).get(b"content-encoding", b"identity").decode("latin-1").strip()
        try:
            if coding.lower() not in ("", "identity"):  # RFC 9110 15.5.16: a content coding the server does not decode is a 415
                await error(415, f"content-encoding {coding} is not supported: send the body uncompressed")(scope, receive, send_counted)
                return
            try:
                body = await self.read_body(receive)
            except (asyncio.CancelledError, UploadsClosed):  # a stop (forced, or past `Uploads.grace_s`) as the body arrives
                await error(503, SHUTTING_DOWN)(scope, receive, send_counted)
                return
            if body is None:  # over the limit; what is large is an init image, whose own limit the server's operator sets
                await error(413, f"request body is over {self.max_body_bytes // 2**20} MiB (an init_image may be at most "
                                 f"{self.max_upload_bytes // 2**20} MiB on this server)")(scope, receive, send_counted)
            elif body is False:  # the client left before sending it: nobody to answer
                status[0] = 499
            else:
                try:
                    await self.app(scope, replayed(body, receive), send_counted)
                except Exception as exc:
                    if started:  # the answer is under way: only closing the connection tells the client it failed
                        raise
                    logger.exception("%s %s failed", scope["method"], scope["path"])
                    await error(500, INTERNAL.format(type(exc).__name__))(scope, receive, send_counted)
        finally:  # an unexpected exception raised on too, as the 500 it becomes
            if route_path(scope) == IMAGE_PATH:
                self.metrics.response(status[0], time.perf_counter() - start if status[0] == 200 else None)


def route_path(scope) -> str:
    """A request's path as the app's routes name it: without the prefix the app is served under (uvicorn's --root-path, a
    Mount), which the ASGI scope's path includes."""
    return scope["path"].removeprefix(scope.get("root_path", ""))


def headers_only(send):
    """An ASGI send that passes a response's start (its status and headers, Content-Length included) and ends it with an
    empty body: the answer to HEAD."""

    async def send_headers(message):
        if message["type"] != "http.response.body":
            await send(message)
        elif not message.get("more_body", False):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return send_headers


def not_found(request: Request) -> Response:
    """The answer for a path that no route has: a 404, which names the route when the path is a route's with a trailing
    slash (`POST /v1/images/`). Starlette redirected it (307, empty body): a client that does not follow redirects read
    nothing, and one that does sent its body twice. Serving it as well would give an operation a second path that
    /openapi.json and the metrics (counted by path) do not know. The one redirect kept is the app's root named without
    its slash under a root path (`/lcm` to `/lcm/`), where the page's relative URLs need the slash."""
    root, path = request.scope.get("root_path", ""), request.scope["path"]
    if root and path == root:
        return RedirectResponse(str(URL(scope=dict(request.scope, path=path + "/"))))
    asked = route_path(request.scope)
    if asked.endswith("/") and any(getattr(route, "path", None) == asked.rstrip("/") for route in request.app.routes):
        return error(404, f"Not Found: the path is {path.rstrip('/')}, without the trailing slash")
    return error(404, "Not Found")


def header_value(text: str) -> str:
    """`text` as an HTTP header value, which is Latin-1: the notes' ω spelled out, anything else outside it as "?"."""
    return text.replace("ω", "omega").encode("latin-1", "replace").decode("latin-1")


def preview_decoder_name(generator: LCMGenerator) -> str | None:
    """The path or hub id of the preview decoder `generator` decodes with (`preview.PreviewDecoder.source`), None for the
    VAE's own decoder: read from the generator at each answer, so that the app names the decoder its images come from."""
    preview = generator.model.preview_decoder
    return None if preview is None else preview.source


def create_app(generator: LCMGenerator, limits: Limits, model_name: str = "", max_batch: int = 8, max_queue: int = 32,
               max_wait_s: float = 0.005, lora: str | None = None, style_loras: Sequence[tuple[str, float]] = ()) -> FastAPI:
    """The app serving `generator`; `model_name`, `lora` and `style_loras` (path, weight each) are what it was loaded from, which
    /v1/config describes, with the preview decoder the generator decodes with (`LCMGenerator.use_preview_decoder`), if any."""
    metrics = Metrics()
    batcher = Batcher(lambda jobs: run_jobs(generator, jobs), max_batch, max_queue, max_wait_s, metrics)
    default_guidance = generator.default_guidance_scale()
    decoding = anyio.CapacityLimiter(MAX_DECODING)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        except asyncio.CancelledError:  # a forced stop (a second Ctrl-C) cancels the lifespan as it waits: a stop, no failure to
            pass  # report (starlette would log the cancellation's traceback as "shutdown failed")
        finally:
            try:
                batcher.stop()
            except KeyboardInterrupt as stop:  # a further stop while the batch in flight is made: kept for the server's runner
                app.state.shutdown_stop = stop  # (`cli.serve.stop_batcher`) to say, not logged by starlette as a failed shutdown

    app = FastAPI(title="latent-consistency", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  redirect_slashes=False, description="Few-step text-to-image and image-to-image with a latent consistency model "
                                                      "(Luo et al. 2023).")
    app.router.route_class = JSONRoute
    app.state.batcher, app.state.metrics, app.state.uploads = batcher, metrics, Uploads()
    app.state.shutdown_stop = None  # a Ctrl-C or SIGTERM that came while the lifespan waited for the batch in flight
    app.add_middleware(Guard, max_body_bytes=limits.max_body_bytes, max_upload_bytes=limits.max_upload_bytes, metrics=metrics,
                       uploads=app.state.uploads)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error")
            return error(422, "the body is not valid JSON" + (f": {reason}" if reason else ""))
        if first.get("loc") == ("body",) and isinstance(first.get("input"), bytes | bytearray):  # FastAPI parses JSON only
            content_type = request.headers.get("content-type") or "missing"
            return error(415, f"content-type is {content_type}: send the body as JSON with content-type: application/json")
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
        if first.get("type") == "string_unicode":  # a lone surrogate in a str field, refused before its own validator runs
            return error(422, f"{where}: not Unicode text ({utf8_error(first['input'])})")
        return error(422, f"{where}: {first.get('msg', 'invalid').removeprefix('Value error, ')}")  # a validator's own words

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        """Starlette's and FastAPI's own answers (404, 405, a body it cannot parse) in the same one-line shape."""
        if exc.status_code == 404:
            return not_found(request)
        return error(exc.status_code, str(exc.detail).splitlines()[0] if exc.detail else "error", headers=exc.headers)

    @app.exception_handler(UserError)
    async def user_error(request, exc: UserError):
        return error(422, str(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(request, exc: QueueFull):
        return error(429, str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(torch.OutOfMemoryError)
    async def out_of_memory(request, exc: torch.OutOfMemoryError):
        """A request whose image the device has no memory for, alone (the batcher ran it on its own after its batch
        failed): the request's size, not a fault of the server, which frees the allocator's cache and serves on."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return error(507, OUT_OF_MEMORY)

    refused = {status: {"model": ErrorAnswer, "description": why} for status, why in (
        (413, "the body is over the limit"), (415, "the body is not JSON (content-type), or is compressed (content-encoding)"),
        (422, "an invalid request: malformed JSON, a wrong type, a value out of range, an unreadable init image"),
        (429, "the queue is full (Retry-After)"), (500, "the model failed"), (503, "the server is shutting down"),
        (507, "the device ran out of memory for this image alone"))}
    answer = {"content": {t: {} for t in MEDIA_TYPES.values()},
              "description": "the image; X-Seed, X-Latency-Ms, X-Batch-Size headers, X-Prompt-Truncated when the prompt is "
                             "longer than the text encoder reads (its end is dropped), X-Negative-Prompt-Truncated the same for "
                             "negative_prompt, X-Guidance-Note when the guidance scale is outside the range the LCM was distilled on, "
                             "or the LCM ignores it, X-Seed-Note when the seed is "
                             "2^32 or more (its image is a smaller seed's), and X-Preview-Decoder when the server decodes with a "
                             "tiny preview decoder (`lcm serve --preview-decoder`: approximate images, not for measuring the model; "
                             "its path or hub id)"}

    def left() -> Response:
        """The answer (read by no one) to a client that went away before its image was made: counted as cancelled."""
        metrics.cancel()
        return Response(status_code=499)

    @app.post(IMAGE_PATH, response_class=Response, responses={200: answer} | refused)
    async def images(body: ImageRequest, request: Request) -> Response:
        """Generate one image (text-to-image, or image-to-image with `init_image`)."""
        start = time.perf_counter()
        # its place in the queue first: a full queue refuses at once (429), before an upload is decoded, and the requests
        # being decoded count against --max-queue as queued ones do
        with batcher.place() as place:
            # in a thread: decoding an upload takes a while; a few at a time, as each may take hundreds of MB. A client that
            # left meanwhile (the page aborts a request at each keystroke) is dropped before its turn to decode, and before
            # it queues, where an idle worker would take it before the next poll
            async with decoding if body.init_image is not None else contextlib.nullcontext():
                if await request.is_disconnected():
                    return left()
                job = await anyio.to_thread.run_sync(prepare, body, generator, limits, default_guidance)
            if await request.is_disconnected():
                return left()
            future = batcher.submit(job, place)
        waiting = asyncio.wrap_future(future)
        try:
            while not (await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    return left() if batcher.cancel(future) else Response(status_code=499)  # running: its image is dropped
        except asyncio.CancelledError:  # a forced exit (a second Ctrl-C) cancels the waiting requests: answered as at shutdown
            batcher.cancel(future)
            return error(503, SHUTTING_DOWN)
        if future.cancelled():  # the batcher stopped with it queued: the server is shutting down
            return error(503, SHUTTING_DOWN)
        data, batch_size, truncated, negative_truncated = waiting.result()
        headers = {"X-Seed": str(job.seed), "X-Batch-Size": str(batch_size), "X-Latency-Ms": f"{(time.perf_counter() - start) * 1e3:.1f}"}
        if truncated:  # as `lcm generate` notes it: the end was not read
            headers["X-Prompt-Truncated"] = f"{truncated[0]} tokens, the text encoder reads {truncated[1]}"
        if negative_truncated:  # as `lcm generate` notes it for --negative-prompt
            headers["X-Negative-Prompt-Truncated"] = f"{negative_truncated[0]} tokens, the text encoder reads {negative_truncated[1]}"
        notes = generator.guidance_notes(job.guidance_scale, given=body.guidance_scale is not None)
        notes += filter(None, [generator.unguided_note(job.guidance_scale, "guidance_scale")])  # as `lcm generate` notes it
        if notes:
            headers["X-Guidance-Note"] = header_value("; ".join(notes))
        seed_note = repeated_seed_note(job.seed, flag="seed")  # as `lcm generate` notes it: taken, as diffusers takes it
        if seed_note:
            headers["X-Seed-Note"] = seed_note
        preview = preview_decoder_name(generator)
        if preview is not None:  # as `lcm generate` records it in each PNG: the image is an approximate preview
            headers["X-Preview-Decoder"] = header_value(preview)
        return Response(data, media_type=MEDIA_TYPES[job.format], headers=headers)

    def openapi() -> dict:
        """FastAPI's description, with ImageRequest's schema as pydantic writes it: FastAPI's model of a schema holds every
        bound as a float, which made the seed's maximum 2^63 (9.223372036854776e+18, a seed the server refuses) and the
        steps' 8.0."""
        if app.openapi_schema is None:
            FastAPI.openapi(app)["components"]["schemas"]["ImageRequest"] = ImageRequest.model_json_schema()
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/v1/config")
    async def config() -> dict:
        """The model (with the LoRAs loaded onto it, and the preview decoder its images are decoded with: null for the VAE's
        decoder) and the limits: what the page needs to set its controls (`ignores_guidance`: the LCM's record measured it
        hardly responding to g, `GuidanceRecord.ignores_guidance`)."""
        record = generator.model.guidance_record  # the LCM's distilled range (`guidance_record`), null without one
        return {"model": model_name, "lora": lora, "style_loras": [[path, weight] for path, weight in style_loras],
                "preview_decoder": preview_decoder_name(generator),
                "kind": generator.kind, "default_guidance_scale": default_guidance,
                "guidance_scale_range": None if record is None else [record.guidance_scale_min, record.guidance_scale_max],
                "ignores_guidance": record is not None and record.ignores_guidance(),
                "default_size": generator.default_size(), "max_side": limits.max_side, "max_steps": MAX_STEPS,
                "max_prompt_chars": limits.max_prompt_chars, "max_upload_bytes": limits.max_upload_bytes,
                "vae_factor": generator.model.codec.downsampling_factor}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queue_depth": len(batcher.queue)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("latent_consistency.serve").joinpath("page.html").read_text(encoding="utf-8"))

    return app
