"""`latentdiff serve`: a local web page over the library, on the standard library's HTTP server.

    forms.py    the page's forms read and checked (InputError names the field and the fix)
    session.py  the one model in memory: samplers (a registry), LoRA adapters from one folder, defaults, the runs
    jobs.py     the queue: one worker thread samples one request at a time; progress for the page's bar
    server.py   HTTP routes (JSON API, the static page), `serve()`
    static/     index.html, app.js, style.css: the page, no build step and no outside resources

Why not Gradio: measured 2026-12-03 on this machine, `pip install gradio` (6.31) adds 18 distributions and 88 MiB to
this project's environment (367 MiB in a fresh one) and its server takes 2.1 s from `python` to the first page (1.9 s
of it importing gradio); the standard library's server adds nothing and serves its first page in 0.03 s.
"""

from latentdiff.webui.server import serve

__all__ = ["serve"]
