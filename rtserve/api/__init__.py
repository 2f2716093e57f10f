"""HTTP/WebSocket front end: OpenAI- and Anthropic-compatible routes over an async engine client.

`build_app(engine_client, settings)` (app.py) makes the FastAPI app; `server.main(argv)` runs it on uvicorn.
"""
