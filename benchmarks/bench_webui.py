"""`latentdiff serve` against `latentdiff generate`: how soon the page is up, and the first image through each.

Each repeat starts `latentdiff serve --port P` and times, from the command: the first page served (GET /), the model
ready (/api/config says "ready"), the first image (one 25-step DDIM request through the JSON API, as the page sends
it, polled every 0.1 s), then a second request alone (the model already in memory). Then it times `latentdiff generate`
on the same prompt, seed and settings (import, load and one image: the CLI's whole cost). Runs alternate (serve,
generate, generate, serve, ...) so load from other processes hits both alike; the table gives medians and the ratios
serve / generate (< 1: the web page gives the image sooner).

    python -m benchmarks.bench_webui                # 3 repeats
    python -m benchmarks.bench_webui --repeats 1
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

PROMPT = "a large red circle in the top left on a black background"
FORM = {
    "prompt": PROMPT,
    "sampler": "ddim",
    "steps": 25,
    "guidance": 5,
    "seed": 0,
    "width": 64,
    "height": 64,
    "num_images": 1,
    "loras": [],
}
POLL_S = 0.1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch(url: str, body: dict | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=300) as answer:
        return answer.read()


def wait_for_image(base: str) -> None:
    job = json.loads(fetch(f"{base}/api/txt2img", FORM))["job"]
    while (state := json.loads(fetch(f"{base}/api/jobs/{job}"))["state"]) not in ("done", "error"):
        time.sleep(POLL_S)
    if state != "done":
        raise RuntimeError(f"the job ended in {state}")


def time_serve() -> dict[str, float]:
    """Seconds from `latentdiff serve` to the first page, the model ready, the first image; then one more image."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    server = subprocess.Popen(["latentdiff", "serve", "--port", str(port)], stderr=subprocess.DEVNULL)
    times = {}
    try:
        while True:
            try:
                fetch(f"{base}/")
                break
            except OSError:
                time.sleep(0.02)
        times["first page"] = time.perf_counter() - start
        while json.loads(fetch(f"{base}/api/config"))["state"] != "ready":
            time.sleep(POLL_S)
        times["model ready"] = time.perf_counter() - start
        wait_for_image(base)
        times["first image"] = time.perf_counter() - start
        again = time.perf_counter()
        wait_for_image(base)
        times["next image"] = time.perf_counter() - again
    finally:
        server.terminate()
        server.wait()
    return times


def time_generate(folder: Path) -> float:
    """Seconds of `latentdiff generate` with the request's settings (import, load, sample, write)."""
    command = ["latentdiff", "generate", PROMPT, "--seed", "0", "--steps", "25", "--guidance", "5"]
    start = time.perf_counter()
    out = folder / f"out-{start}.png"
    subprocess.run([*command, "--sampler", "ddim", "-o", str(out)], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    serve_runs, generate_runs = [], []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.repeats):
            order = (True, False) if i % 2 == 0 else (False, True)
            for serve_first in order:
                if serve_first:
                    serve_runs.append(time_serve())
                else:
                    generate_runs.append(time_generate(Path(folder)))
    generate_s = statistics.median(generate_runs)
    print(
        f"# {args.repeats} repeats; `latentdiff generate` (import + load + image): median {generate_s:.2f} s"
    )
    print("| latentdiff serve | median s | each run, s | ratio to generate |")
    print("|---|---|---|---|")
    for key in serve_runs[0]:
        values = [run[key] for run in serve_runs]
        median = statistics.median(values)
        each = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {key} | {median:.2f} | {each} | {median / generate_s:.2f} |")


if __name__ == "__main__":
    main()
