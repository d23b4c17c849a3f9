"""Start-up time of `latentdiff generate` with the embedded default: import, load, sample and save, end to end.

    python benchmarks/bench_startup.py --runs 5

Runs the command `--runs` times in fresh processes (wall time and the child's CPU time, user + sys, the exit
included), then once more in-process, garbage collection off as the command runs, with a mark after each phase
(import torch, transformers' CLIP tokenizer and text model, diffusers' top level and AutoencoderKL, our modules, loading
the default, sampling at its carried settings and saving), so the share of each is visible. Each import phase counts
only what the ones before it left to import: transformers comes first because diffusers imports much of it (timed
after diffusers, transformers' CLIP looks free, and diffusers carries its cost). CPU time is the figure to trust on a shared
machine: wall time there includes waiting for a core.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a large red circle in the top left on a black background"

# run in a fresh interpreter: one line per phase, "name<TAB>cpu seconds<TAB>wall seconds"
PHASES = """
import gc, resource, time
gc.disable()  # as `latentdiff generate` runs (latentdiff.cli._no_garbage_collection)
def now():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, time.perf_counter()
marks = [("start", *now())]
def mark(name): marks.append((name, *now()))
import torch; mark("import torch")
from transformers import CLIPTokenizer; mark("from transformers import CLIPTokenizer")
from transformers import CLIPTextModel; mark("from transformers import CLIPTextModel")
import diffusers; mark("import diffusers (top level)")
from diffusers import AutoencoderKL; mark("from diffusers import AutoencoderKL")
import latentdiff.cli, pipelines.latent_pipeline; mark("import latentdiff.cli, pipelines")
pipe = pipelines.latent_pipeline.LatentPipeline(); mark("load the embedded default")
pipe.set_progress_bar_config(disable=True)
image = pipe({prompt!r}, generator=torch.Generator().manual_seed(0)).images[0]
image.save({out!r}); mark("sample at the carried settings and save")
for (_, c0, w0), (name, c1, w1) in zip(marks, marks[1:]):
    print(f"{{name}}\\t{{c1 - c0:.3f}}\\t{{w1 - w0:.3f}}")
"""


def time_command(command: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + sys) of one run of `command` in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    cli = shutil.which("latentdiff") or str(Path(sys.executable).with_name("latentdiff"))
    print(
        f"# {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.getloadavg()=}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.png")
        runs = [
            time_command([cli, "generate", PROMPT, "-o", out, "--seed", str(i), "--overwrite"])
            for i in range(args.runs)
        ]
        walls, cpus = zip(*runs)
        print(f"latentdiff generate, {args.runs} runs: wall " + ", ".join(f"{w:.2f}" for w in walls) + " s")
        print(
            f"  median wall {statistics.median(walls):.2f} s (min {min(walls):.2f}); median CPU "
            f"{statistics.median(cpus):.2f} s (min {min(cpus):.2f})"
        )
        done = subprocess.run(
            [sys.executable, "-c", PHASES.format(prompt=PROMPT, out=out)],
            check=True,
            capture_output=True,
            text=True,
        )
    print("\n| phase | CPU s | wall s |\n|---|---|---|")
    rows = [line.split("\t") for line in done.stdout.strip().splitlines()]
    for name, cpu, wall in rows:
        print(f"| {name} | {float(cpu):.2f} | {float(wall):.2f} |")
    print(f"| total | {sum(float(r[1]) for r in rows):.2f} | {sum(float(r[2]) for r in rows):.2f} |")
    print(f"# {os.getloadavg()=}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
