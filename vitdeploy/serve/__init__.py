"""`vitdeploy serve`: an HTTP inference server with dynamic batching (FastAPI + uvicorn,
the `serve` extra). Import `vitdeploy.serve.app` only where serving is wanted."""
