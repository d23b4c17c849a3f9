"""The HTTP side of `latentdiff serve`: the standard library's ThreadingHTTPServer, a JSON API and one static page.

| method, path                     | answer                                                                     |
|----------------------------------|----------------------------------------------------------------------------|
| GET  /                           | the page (static/index.html)                                               |
| GET  /static/<name>              | app.js, style.css: a fixed list, never a path from the URL                 |
| GET  /api/config                 | {"state": "loading" \\| "failed" \\| "ready", model, defaults, samplers, adapters, limits, editing} |
| POST /api/txt2img                | form JSON -> 202 {"job": id}; bad input -> 400 {"error", "field"}          |
| POST /api/edit                   | form JSON with `image` (and `mask`) data URLs -> 202 / 400 / 501 (no editing pipelines) |
| GET  /api/jobs/<id>              | {"state", "position", "step", "total", "error", "images": [{url, seed, parameters}]} |
| GET  /api/images/<id>/<n>.png    | the PNG, generation settings in its text chunks                            |

Safety: it listens on 127.0.0.1 unless told otherwise and then answers only requests addressed to localhost (the
Host header: no DNS-rebinding page can drive it); request bodies over `max_body` bytes are refused before being
read; files are served from a fixed table and images from memory, so no URL reaches the file system; one worker
samples at a time (jobs.JobQueue) and every handler turns errors into a JSON message, so the server keeps serving.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from latentdiff.webui import forms
from latentdiff.webui.jobs import Job, JobQueue, QueueFull
from latentdiff.webui.session import ModelSession, editing_pipeline, sampler_choices

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
MAX_BODY = 8 * 2**20  # bytes of one request: two uploaded images as base64 data URLs
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
JOB_PATH = re.compile(r"^/api/jobs/([0-9a-f]{16})$")
IMAGE_PATH = re.compile(r"^/api/images/([0-9a-f]{16})/(\d{1,2})\.png$")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:",
    "Cache-Control": "no-store",
}


class WebUIServer(ThreadingHTTPServer):
    """The server: one `ModelSession`, one `JobQueue`, the static files read once at start.

    Args:
        session: the model; host, port: where to listen (port 0: a free port, see `url`); max_body: largest request
        body in bytes.
    """

    daemon_threads = True

    def __init__(
        self, session: ModelSession, host: str = "127.0.0.1", port: int = 7860, max_body: int = MAX_BODY
    ):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.jobs = JobQueue()  # before binding: a failed bind calls server_close
        super().__init__((host, port), RequestHandler)
        self.session = session
        self.max_body = max_body
        self.loopback_only = host in LOOPBACK_HOSTS
        self.static = {name: (STATIC_DIR / name).read_bytes() for name in STATIC_TYPES}
        self.jobs.start(first=session.load)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        self.jobs.stop()


class RequestHandler(BaseHTTPRequestHandler):
    """Routes the table of the module docstring; every answer but the static files and PNGs is JSON."""

    server: WebUIServer
    server_version = "latentdiff-serve"

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        self._guarded(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._post)

    def _guarded(self, route) -> None:
        """Answer only localhost (when listening there); an unexpected error is a 500 JSON answer and a log entry."""
        if not self._host_allowed():
            return
        try:
            route()
        except ConnectionError:  # the browser went away
            pass
        except Exception as error:
            logger.exception("%s %s failed", self.command, self.path)
            self._error(
                HTTPStatus.INTERNAL_SERVER_ERROR, "server", f"internal error ({error}); see the server log."
            )

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            path = "/static/index.html"
        if path.startswith("/static/") and path.removeprefix("/static/") in STATIC_TYPES:
            name = path.removeprefix("/static/")
            return self._send(HTTPStatus.OK, self.server.static[name], STATIC_TYPES[name])
        if path == "/api/config":
            return self._json(HTTPStatus.OK, page_config(self.server.session))
        if match := JOB_PATH.match(path):
            job = self.server.jobs.get(match[1])
            if job is None:
                return self._error(
                    HTTPStatus.NOT_FOUND, "job", "no such job (finished jobs are kept for a while)."
                )
            return self._json(HTTPStatus.OK, job_status(job, self.server.jobs.position(job)))
        if match := IMAGE_PATH.match(path):
            job, index = self.server.jobs.get(match[1]), int(match[2])
            if job is None or job.state != "done" or index >= len(job.results):
                return self._error(HTTPStatus.NOT_FOUND, "image", "no such image.")
            return self._send(HTTPStatus.OK, job.results[index].png, "image/png")
        self._error(HTTPStatus.NOT_FOUND, "path", f"nothing at {path!r}.")

    def _post(self) -> None:
        handlers = {"/api/txt2img": submit_text_to_image, "/api/edit": submit_edit}
        handler = handlers.get(self.path)
        if handler is None:
            return self._error(HTTPStatus.NOT_FOUND, "path", f"nothing to post at {self.path!r}.")
        form = self._read_json()
        if form is None:
            return
        try:
            status, answer = handler(self.server, form)
        except forms.InputError as error:
            status, answer = HTTPStatus.BAD_REQUEST, {"error": str(error), "field": error.field}
        except QueueFull as error:
            status, answer = HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(error), "field": "request"}
        self._json(status, answer)

    # ------------------------------------------------------------------------------------------ plumbing

    def _host_allowed(self) -> bool:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if self.server.loopback_only and host not in LOOPBACK_HOSTS:
            self._error(HTTPStatus.FORBIDDEN, "host", "this server answers requests to localhost only.")
            return False
        return True

    def _read_json(self) -> Any | None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(HTTPStatus.LENGTH_REQUIRED, "request", "send a Content-Length header.")
            return None
        if length > self.server.max_body:
            self.close_connection = True
            limit = self.server.max_body // 2**20
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "image",
                f"the upload is over {limit} MiB; send a smaller image.",
            )
            return None
        try:
            return json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._error(HTTPStatus.BAD_REQUEST, "request", "the request body is not JSON.")
            return None

    def _json(self, status: HTTPStatus, answer: dict) -> None:
        self._send(status, json.dumps(answer).encode(), "application/json")

    def _error(self, status: HTTPStatus, field: str, message: str) -> None:
        self._json(status, {"error": f"{field}: {message}", "field": field})

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # the page polls: keep the terminal quiet
        logger.debug("%s %s", self.address_string(), format % args)


# ------------------------------------------------------------------------------------ the page's handlers


def page_config(session: ModelSession) -> dict[str, Any]:
    """What the page needs to build its form: the model's state, defaults, samplers, adapters and limits."""
    if session.load_error is not None:
        return {"state": "failed", "error": session.load_error, "model": session.model_name}
    if not session.loaded:
        return {"state": "loading", "model": session.model_name}
    choices = session.choices()
    return {
        "state": "ready",
        "model": session.model_name,
        "defaults": session.defaults(),
        "samplers": sampler_choices(),
        "adapters": list(choices.adapters),
        "limits": {
            "size_multiple": choices.size_multiple,
            "max_side": choices.max_side,
            "max_steps": choices.max_steps,
            "max_images": choices.max_images,
            "max_upload_bytes": MAX_BODY,
        },
        "editing": {kind: editing_pipeline(kind) is not None for kind in ("img2img", "inpaint")},
    }


def _ready_choices(server: WebUIServer) -> forms.Choices:
    session = server.session
    if session.load_error is not None:
        raise forms.InputError("model", session.load_error)
    if not session.loaded:
        raise forms.InputError("model", "the model is still loading; try again in a few seconds.")
    return session.choices()


def submit_text_to_image(server: WebUIServer, form: Any) -> tuple[HTTPStatus, dict]:
    """Check a text-to-image form and queue it: (202, {"job": id})."""
    request = forms.parse_text_to_image(form, _ready_choices(server))
    job = server.jobs.submit(lambda progress: server.session.text_to_image(request, progress))
    return HTTPStatus.ACCEPTED, {"job": job.id}


def submit_edit(server: WebUIServer, form: Any) -> tuple[HTTPStatus, dict]:
    """Check an edit form (image, optional mask) and queue it; 501 when this version has no editing pipelines."""
    request = forms.parse_edit(form, _ready_choices(server))
    kind = "inpaint" if request.mask is not None else "img2img"
    if editing_pipeline(kind) is None:
        message = "image-to-image and inpainting are not available in this version of latentdiff."
        return HTTPStatus.NOT_IMPLEMENTED, {"error": message, "field": "edit"}
    job = server.jobs.submit(lambda progress: server.session.edit(request, progress))
    return HTTPStatus.ACCEPTED, {"job": job.id}


def job_status(job: Job, position: int) -> dict[str, Any]:
    """A job as the page polls it: state, queue position, steps, error, and once done its images."""
    images = [
        {"url": f"/api/images/{job.id}/{i}.png", "seed": result.seed, "parameters": result.parameters}
        for i, result in enumerate(job.results)
    ]
    return {
        "state": job.state,
        "position": position,
        "step": job.step,
        "total": job.total,
        "error": job.error,
        "images": images,
    }


def serve(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    lora_dir: str | None = None,
    device: str | None = None,
) -> None:
    """Run the web UI until Ctrl-C: the page at http://host:port/, the model loading in the background."""
    if lora_dir is not None and not Path(lora_dir).is_dir():
        raise FileNotFoundError(
            f"--lora-dir {lora_dir!r} is not a folder; pass the folder that holds your adapters."
        )
    try:
        server = WebUIServer(ModelSession(model, lora_dir, device), host, port)
    except OSError as error:
        raise ValueError(
            f"cannot listen on {host}:{port} ({error.strerror or error}); pick another --port (0: any free one) "
            "or stop what uses it."
        ) from None
    print(
        f"latentdiff serve: {server.url} (model: {server.session.model_name}; Ctrl-C stops)", file=sys.stderr
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
