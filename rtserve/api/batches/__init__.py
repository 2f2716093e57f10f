"""Batch API: OpenAI Files + Batches and Anthropic Message Batches, durable in SQLite under --data-dir.

settings.py (BatchSettings), store.py (SQLite + file bodies), validate.py (input-file checks),
runner.py (execution, expiry, cancellation, output files, retention), objects.py (wire shapes),
service.py (wiring), routes_files.py / routes_openai.py / routes_anthropic.py (HTTP),
cli.py (`rtserve batch`, a client of any server with these routes).
"""
