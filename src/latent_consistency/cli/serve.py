"""`lcm serve`: an LCM (or a diffusion model with an LCM-LoRA), with style LoRAs beside it as `lcm generate --style-lora` mixes
them, behind an HTTP API and a page that draws as you type (`latent_consistency.serve`). Binds to localhost unless --host
says otherwise."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import signal
import socket
import sys
import time
import warnings

from latent_consistency.allocator import keep_freed_memory
from latent_consistency.cli.arguments import positive_int, source
from latent_consistency.cli.generate import STYLE_LORA_HELP, parse_style_lora
from latent_consistency.devices import DTYPES, resolve_device, resolve_dtype
from latent_consistency.errors import UserError


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def root_path(text: str) -> str:
    """--root-path: the path prefix a reverse proxy serves the app under and strips (uvicorn's root_path), without its
    final slash; "" or "/" for none."""
    if text and not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL path: give it with its leading slash, e.g. /lcm")
    return text.rstrip("/")


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port as uvicorn binds one (IPv6 for a host with ":"), not yet listening; a UserError if
    the address cannot be had (the port in use, an unknown host, ...)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def warm_up(generator) -> None:
    """Compile the generator and make one image of the default size, so that the first request does not wait for it."""
    from latent_consistency.pipelines import DEFAULT_GUIDANCE_SCALE

    size, started = generator.default_size(), time.perf_counter()
    print("lcm serve: compiling (the first batch of another size or image size compiles once more)", flush=True)
    generator.compile()
    generator(["warm-up"], generator.timesteps(1), DEFAULT_GUIDANCE_SCALE[generator.kind], [0], size, size)
    print(f"lcm serve: compiled in {time.perf_counter() - started:.0f} s", flush=True)


def build_app(args):
    """The app of the model and limits the arguments name: the model loaded (and compiled with --compile)."""
    from latent_consistency.pipelines import MAX_SIZE_FACTOR, LCMGenerator
    from latent_consistency.serve.app import create_app
    from latent_consistency.serve.request import Limits

    styles = [parse_style_lora(text) for text in args.style_lora]
    device = resolve_device(args.device)
    keep_freed_memory(device)
    generator = LCMGenerator.load(args.model, device, resolve_dtype(args.dtype, device), args.lora, styles, lora_flag="--lora")
    if args.preview_decoder is not None:
        generator.use_preview_decoder(args.preview_decoder)
    if args.max_side is not None and args.max_side < generator.default_size():
        raise UserError(f"--max-side {args.max_side} is below the model's size of {generator.default_size()} px: every request "
                        "without a width and height (the page's) would be refused")
    if args.max_side is not None and args.max_side > MAX_SIZE_FACTOR * generator.default_size():
        raise UserError(f"--max-side {args.max_side} is more than {MAX_SIZE_FACTOR}x the model's {generator.default_size()} px, which "
                        f"no request may ask for: give at most {MAX_SIZE_FACTOR * generator.default_size()}")
    grid = generator.model.codec.downsampling_factor * generator.model.patch_size  # the sides the model makes (`request_size`)
    if args.max_side is not None and args.max_side % grid:  # /v1/config would publish a size that every request is refused
        raise UserError(f"--max-side {args.max_side} is not a multiple of the model's grid {grid}: give "
                        f"{args.max_side - args.max_side % grid}")
    if args.compile:
        warm_up(generator)
    limits = Limits(max_side=args.max_side or 2 * generator.default_size(), max_prompt_chars=args.max_prompt_chars,
                    max_upload_bytes=args.max_upload_mb * 2**20, max_body_bytes=(args.max_upload_mb * 4 // 3 + 1) * 2**20)
    return create_app(generator, limits, model_name=args.model, max_batch=args.max_batch, max_queue=args.max_queue, lora=args.lora,
                      style_loras=styles)


def run(args) -> None:
    import uvicorn

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a TCP port (1-65535)")
    if not args.host.strip():  # bind("") is every interface: an unset variable must not open the server to the network
        raise UserError("--host is empty; leave it out for 127.0.0.1, or give 0.0.0.0 (or ::) to listen on every interface")
    from latent_consistency.pipelines import RepeatedSeedWarning, UnguidedScaleWarning

    warnings.filterwarnings("ignore", category=RepeatedSeedWarning)  # said to the client, in the response's X-Seed-Note
    warnings.filterwarnings("ignore", category=UnguidedScaleWarning)  # said to the client, in the response's X-Guidance-Note
    with bind(args.host, args.port) as sock:  # before the model loads: a port in use is known at once
        app = build_app(args)
        if not is_loopback(args.host):
            print(f"lcm serve: listening on {args.host}, reachable from other machines; there is no authentication", file=sys.stderr)
        sock.listen()  # connections wait from here until uvicorn accepts them
        host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL
        print(f"lcm serve: {args.model} on http://{host}:{args.port}/ (API: POST /v1/images, description: /openapi.json)", flush=True)
        server = stoppable_server(uvicorn.Config(app, log_level="warning", root_path=args.root_path), app.state.uploads)
        try:
            with sigterm_stops(server):
                server.run(sockets=[sock])
        finally:
            stop_batcher(app)


def stop_batcher(app) -> None:
    """End the app's batcher once uvicorn has returned: a forced exit (a second Ctrl-C) skips the lifespan's stop, and the
    batcher's thread must not outlive torch. A further stop while it waits for the batch in flight (here, or in the
    lifespan: `app.state.shutdown_stop`) is raised, for its one line, and the process then ends at once
    (`cli.end_at_once`): the interpreter's exit with that thread still inside torch aborted ("terminate called without an
    active exception", exit -6), and the stop in the lifespan was logged as a traceback."""
    from latent_consistency.cli import end_at_once

    stop = app.state.shutdown_stop
    if stop is None:
        try:
            app.state.batcher.stop()
            return
        except KeyboardInterrupt as further:
            stop = further
    app.state.batcher.stop(wait=False)
    end_at_once()
    raise stop


def stoppable_server(config, uploads):
    """uvicorn's Server for `config`, whose graceful stop (the first Ctrl-C or SIGTERM) closes `uploads` (the app's
    `serve.app.Uploads`): a request whose body has not arrived within `Uploads.grace_s` is answered 503, while requests
    already being made finish. A second SIGTERM forces the stop as a second Ctrl-C does, for a request whose image takes
    longer than one will wait.

    Not uvicorn's `timeout_graceful_shutdown`: past it, uvicorn cancels every request, those generating too."""
    import uvicorn

    class StoppableServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGTERM:
                self.force_exit = True
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            uploads.close()
            await super().shutdown(sockets)

    return StoppableServer(config)


@contextlib.contextmanager
def sigterm_stops(server):
    """SIGTERM while uvicorn serves: a graceful stop, then `Terminated` (one line, exit 143) once uvicorn has returned.
    Uvicorn sends the signal it caught to the handler it found when it stops; `lcm`'s raised `Terminated` there, inside the
    event loop, and the lifespan task it cancelled was logged as a traceback."""
    from latent_consistency.cli import Terminated, _terminated

    if signal.getsignal(signal.SIGTERM) is not _terminated:  # someone else's handler (a test runner, a launcher) stays
        yield
        return
    caught = []

    def note(signum, frame) -> None:
        caught.append(signum)
        server.should_exit = True

    signal.signal(signal.SIGTERM, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, _terminated)
    if caught:
        raise Terminated


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve an LCM over HTTP, with a page that draws as you type",
                              description=__doc__)
    p.add_argument("--model", required=True, type=source, help="an LCM folder or hub id; with --lora, the diffusion model the LoRA was distilled from")
    p.add_argument("--lora", type=source, help="an LCM-LoRA to load onto --model")
    p.add_argument("--style-lora", action="append", default=[], metavar="FILE[:WEIGHT]", help=STYLE_LORA_HELP)
    p.add_argument("--preview-decoder", type=source, help="decode with a tiny TAESD-style decoder (an AutoencoderTiny folder or hub id, e.g. "
                   "madebyollin/taesd; `lcm world preview-decoder` makes one for the world): faster, approximate images, "
                   "said in /v1/config's preview_decoder and each image's X-Preview-Decoder header")
    p.add_argument("--compile", action="store_true", help="torch.compile the text encoder, network and decoder before serving (about a minute "
                   "per batch size on a CPU, then faster requests; with --dtype bfloat16 the fast path for large CPU batches)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--root-path", type=root_path, default="", help="the path prefix a reverse proxy serves the app under and strips "
                   "before passing requests on (e.g. /lcm for https://host/lcm/ passed on as /): uvicorn's --root-path, which "
                   "/openapi.json then names as its server (default: none)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="most requests run as one forward pass (default 8)")
    p.add_argument("--max-queue", type=positive_int, default=32, help="requests that may wait; more get 429 (default 32)")
    p.add_argument("--max-side", type=positive_int, help="largest width or height in pixels (default: twice the model's size)")
    p.add_argument("--max-prompt-chars", type=positive_int, default=1000, help="longest prompt (default 1000 characters)")
    p.add_argument("--max-upload-mb", type=positive_int, default=4, help="largest init image upload in MiB (default 4)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights and latents dtype (default float32)")
    p.set_defaults(run=run)
