"""`carrara serve`: a local web page and HTTP API over one loaded model (FastAPI + uvicorn).

`gallery` keeps generated images on disk, `jobs` runs them on one worker thread, `app` is the HTTP API and
serves the page in `static/` (no CDN, no network).
"""
