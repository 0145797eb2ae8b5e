"""`rdjax serve`: an HTTP server batching requests into Predictor.predict. Request decoding
(codec), the batcher, the routes (app), what it refuses (limits, guard), the uvicorn runner
and the command (server), and the page it serves (page.html)."""
