"""`rtserve bench`: an SLO load generator for any OpenAI-compatible streaming server.

Modules, in the order a run uses them: `config` (one frozen run config), `workloads` (what to send),
`arrivals` (when to send), `runner` (the single asyncio loop), `client` + `sse` (one streamed request
-> `RequestRecord`), `metrics` (pure functions on records), `report`, `plots`, `compare`, `cli`.
"""
