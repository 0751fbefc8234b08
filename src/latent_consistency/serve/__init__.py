"""`lcm serve`: an LCM behind an HTTP API and a web page that draws as you type.

- `request`: one image request, the server's limits, and which requests may share a forward pass.
- `batcher`: a bounded queue and one worker that runs compatible requests as one batch.
- `metrics`: Prometheus-style counters and histograms.
- `app`: the FastAPI application (`/v1/images`, `/health`, `/metrics`, the page at `/`).
"""
