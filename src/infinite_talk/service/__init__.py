"""The job service: `infinite-talk serve` (HTTP API) and the queue behind it.

`store.JobStore` keeps jobs in SQLite under a data folder and is the Python API any front end (the web UI too) submits
to; `worker.Worker` runs them one per GPU with per-chunk checkpoints (`checkpoint.JobCheckpoint`), so a killed server
resumes each unfinished job from its last finished chunk; `uploads` validates every upload by decoding it;
`api.create_app` is the FastAPI app and `app.add_cli` the `serve` command; `network` decides which Host/Origin a
server without a token answers, `connections` bounds connections (uvicorn). Only `api`/`app`/`connections` need
FastAPI/uvicorn.
"""
