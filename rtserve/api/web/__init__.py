"""The browser side of rtserve: a chat page at `/`, a live dashboard at `/dashboard` and the one
server-sent stats stream the dashboard reads (`/stats/stream`). Static files live in `static/`; nothing
is fetched from a CDN and nothing is built at install time.
"""
