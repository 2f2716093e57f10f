"""A real uvicorn server over the fake engine with the batch API on, for tests that kill and restart it.

    python -m tests.integration.batch_fake_server --port P --data-dir D [--log FILE] [--step-s S]
        [--max-in-flight N] [--api-key K]

`--log` gets one line per request the engine starts (its decoded prompt), appended and flushed at once,
so a test can count how often each batch item ran across a SIGKILL and a restart.
"""
from __future__ import annotations

import argparse

import uvicorn

from rtserve.api.app import ServerSettings, build_app
from rtserve.api.batches.settings import BatchSettings
from tests.integration.fake_engine import FakeEngine


class LoggingFakeEngine(FakeEngine):
    log_path: str | None = None

    async def generate(self, prompt_ids, params, request_id, rt=None, arrival_s=None, admitted=False):
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(self.tokenizer.decode(prompt_ids).replace("\n", " ") + "\n")
        async for out in super().generate(prompt_ids, params, request_id, rt, arrival_s, admitted):
            yield out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--log", default=None)
    p.add_argument("--step-s", type=float, default=0.0)
    p.add_argument("--max-in-flight", type=int, default=2)
    p.add_argument("--api-key", default=None)
    args = p.parse_args()
    engine = LoggingFakeEngine(step_s=args.step_s)
    engine.log_path = args.log
    settings = ServerSettings(api_key=args.api_key, manage_engine_lifecycle=False,
                              batches=BatchSettings(args.data_dir, max_in_flight=args.max_in_flight,
                                                    sweep_interval_s=0.2))
    uvicorn.run(build_app(engine, settings), host="127.0.0.1", port=args.port, log_level="warning",
                lifespan="on")


if __name__ == "__main__":
    main()
