"""`dfuse serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    server.py   start-up, draining on SIGTERM/Ctrl-C, shutdown (engine closed, files removed)
    app.py      the routes: images, videos, models, health, metrics, stats, the status page
    images.py   /v1/images/generations: the request body, sizes, encoding (off the event loop)
    videos.py   /v1/videos: asynchronous jobs with progress, MP4 content, cancel
    files.py    outputs served by URL for a bounded time
    metrics.py  Prometheus families, fed by finished requests and engine.stats()
    errors.py   OpenAI's error object for every refusal
"""
