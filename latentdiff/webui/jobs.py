"""The queue of sampling jobs: one worker thread runs them one at a time, in order; the page polls their state.

A job moves queued -> running -> done | error. While it runs, the pipeline's step callback updates `step` / `total`
(the progress bar); when it ends, `images` holds its results or `error` the message the page shows. A failing job
never stops the worker: bad input and pipeline errors become the job's message, anything else is logged with its
traceback and reported as an internal error. Only the last `keep` finished jobs (and their PNGs) are kept in memory.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Errors whose message is meant for the person at the page (bad values, a missing adapter, no editing pipelines).
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotImplementedError)


class QueueFull(RuntimeError):
    """More jobs are waiting than the queue takes."""


@dataclass
class Job:
    """One request: `run(progress)` returns its results; the other fields are what the page sees."""

    run: Callable[[Callable[[int, int], None]], list[Any]]
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = "queued"
    step: int = 0
    total: int = 0
    error: str | None = None
    results: list[Any] = field(default_factory=list)

    def progress(self, step: int, total: int) -> None:
        self.step, self.total = step, total


class JobQueue:
    """A FIFO of jobs and the one thread that runs them.

    Args:
        max_waiting: queued jobs accepted before `submit` raises QueueFull.
        keep: finished jobs kept for the page to fetch (oldest dropped first).
    """

    def __init__(self, max_waiting: int = 16, keep: int = 32) -> None:
        self.max_waiting = max_waiting
        self.keep = keep
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="latentdiff-sampler", daemon=True)

    def start(self, first: Callable[[], Any] | None = None) -> None:
        """Start the worker; it calls `first` (e.g. loading the model) before taking any job."""
        self._first = first
        self._worker.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the worker end after the running job, waiting up to `timeout` seconds (it is a daemon thread: the
        process may exit while it still samples)."""
        if self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout)

    def submit(self, run: Callable[[Callable[[int, int], None]], list[Any]]) -> Job:
        with self._lock:
            if self.waiting() >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting; try again in a moment.")
            job = Job(run)
            self._jobs[job.id] = job
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def waiting(self) -> int:
        return sum(job.state == "queued" for job in self._jobs.values())

    def position(self, job: Job) -> int:
        """How many jobs run or wait before `job` (0 once it runs)."""
        with self._lock:
            if job.state != "queued":
                return 0
            ahead = [other for other in self._jobs.values() if other.state in ("queued", "running")]
            return ahead.index(job)

    def _work(self) -> None:
        if self._first is not None:
            try:
                self._first()
            except Exception:  # the page reports the load error; the server keeps serving
                logger.exception("loading the model failed")
        while (job := self._queue.get()) is not None:
            job.state = "running"
            try:
                job.results = job.run(job.progress)
                job.state = "done"
            except USER_ERRORS as error:
                job.error, job.state = str(error), "error"
            except Exception as error:
                logger.exception("job %s failed", job.id)
                job.error, job.state = (
                    f"internal error ({type(error).__name__}: {error}); see the server log.",
                    "error",
                )
            self._forget_old()

    def _forget_old(self) -> None:
        with self._lock:
            finished = [job_id for job_id, job in self._jobs.items() if job.state in ("done", "error")]
            for job_id in finished[: max(0, len(finished) - self.keep)]:
                del self._jobs[job_id]
