"""The engine -> API transport's own latency: how long a step's outputs take to reach the API's loop.

The engine core runs in a spawned process and sends one `EngineCoreOutputs` per step over a zmq
channel (rtserve/engine/ipc.py); the API process reads it on a thread and hands it to its asyncio
loop. This script sends messages shaped like a busy step's (`--streams` outputs of one token each,
with the engine stats and queue snapshot every step carries) every `--interval-ms` from a spawned
process whose loop has the engine's shape (compute that releases the GIL, then Python that holds
it), through that channel or (`--transport mp`) the `multiprocessing` queue rtserve used before, and
reports per message:

- `recv`: from just before the child's `put` to the reader thread's `recv` returning;
- `loop`: to the asyncio loop running the callback the reader scheduled (what the API sees);
- `put`: how long `put` itself held the sending (engine) loop.

`--burn N` runs N processes spinning on the CPU beside it, as the engine's compute threads keep the
cores busy in a real server. Both clocks are CLOCK_MONOTONIC, shared by the processes of one host.

    python benchmarks/transport.py --streams 32 --messages 2000 --interval-ms 25 [--burn 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time

import numpy as np

from rtserve.engine.ipc import Channel
from rtserve.protocol import EngineCoreOutput, EngineCoreOutputs, EngineCoreShutdown, EngineStats, QueueSnapshot


def _step_message(num_streams: int, step: int) -> EngineCoreOutputs:
    outputs = [EngineCoreOutput(f"chatcmpl-{i:032x}", [1000 + step % 5000], num_prompt_tokens=256)
               for i in range(num_streams)]
    snap = QueueSnapshot(time.monotonic(), "deadline", step, waiting=[((0, 1.0 + i), 256) for i in range(4)],
                         num_running=num_streams, num_decodes=num_streams,
                         running_remaining_tokens=list(range(num_streams)), num_free_slots=8,
                         step_s=0.03, prefill_token_budget=256, cost_coeffs=(0.012, 0.0006, 0.0007, 0.0, 2.7, 0.011),
                         cost_calibrated=True)
    stats = EngineStats(num_running=num_streams, num_waiting=4, kv_usage=0.3, num_free_blocks=500,
                        num_total_blocks=712, step_time_s=0.03, num_scheduled_tokens=num_streams, queue=snap)
    return EngineCoreOutputs(outputs, 0.0, stats)


def _sender(q, num_streams: int, num_messages: int, interval_s: float, python_s: float, put_times) -> None:
    """The engine loop's shape: a step of compute that releases the GIL (torch ops; here BLAS
    products), its outputs sent, then `python_s` of Python holding the GIL (scheduling the next step)."""
    a = np.random.default_rng(0).standard_normal((192, 192), dtype=np.float32)
    next_t = time.monotonic()
    for step in range(num_messages):
        msg = _step_message(num_streams, step)
        next_t += interval_s
        while time.monotonic() < next_t:  # the step's compute: busy, GIL released
            a @ a
        t0 = time.monotonic()
        msg.timestamp = t0
        q.put(msg)
        put_times[step] = time.monotonic() - t0
        end = time.monotonic() + python_s
        while time.monotonic() < end:  # the next step's scheduling: pure Python
            pass
    q.put(EngineCoreShutdown())  # the end


def _zmq_sender(addr: str, *args) -> None:
    _sender(Channel(addr, sending=True), *args)


def _burn(stop) -> None:
    while not stop.is_set():
        pass


async def _receive(q) -> tuple[list[float], list[float]]:
    loop = asyncio.get_running_loop()
    recv_delays: list[float] = []
    loop_delays: list[float] = []
    done = loop.create_future()

    def on_loop(sent: float) -> None:
        loop_delays.append(time.monotonic() - sent)

    def reader() -> None:
        while True:
            msg = q.get()
            if isinstance(msg, EngineCoreShutdown):
                loop.call_soon_threadsafe(done.set_result, None)
                return
            recv_delays.append(time.monotonic() - msg.timestamp)
            loop.call_soon_threadsafe(on_loop, msg.timestamp)

    threading.Thread(target=reader, daemon=True).start()
    await done
    await asyncio.sleep(0.01)
    return recv_delays, loop_delays


def _ms(values) -> dict[str, float]:
    a = np.asarray(values) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "max_ms": round(float(a.max()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--interval-ms", type=float, default=25.0)
    ap.add_argument("--python-ms", type=float, default=2.0, help="GIL-held work after each send")
    ap.add_argument("--burn", type=int, default=0, help="CPU-spinning processes beside it")
    ap.add_argument("--transport", choices=("mp", "zmq"), default="zmq",
                    help="pyzmq + msgspec (rtserve's, rtserve/engine/ipc.py) or a multiprocessing queue")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")  # as ProcessTransport
    put_times = ctx.Array("d", args.messages)
    sender_args = (args.streams, args.messages, args.interval_ms / 1000, args.python_ms / 1000, put_times)
    if args.transport == "zmq":
        addr = f"ipc://{tempfile.mkdtemp(prefix='rtserve-transport-')}/out"
        q = Channel(addr, sending=False)
        sender = ctx.Process(target=_zmq_sender, args=(addr, *sender_args), daemon=True)
    else:
        q = ctx.Queue()
        sender = ctx.Process(target=_sender, args=(q, *sender_args), daemon=True)
    stop = ctx.Event()
    burners = [ctx.Process(target=_burn, args=(stop,), daemon=True) for _ in range(args.burn)]
    for p in burners:
        p.start()
    sender.start()
    recv_delays, loop_delays = asyncio.run(_receive(q))
    sender.join()
    stop.set()
    for p in burners:
        p.join()
    skip = min(50, len(recv_delays) // 10)  # the first messages pay for the spawn and imports
    print(json.dumps({"transport": args.transport, "streams": args.streams, "messages": args.messages, "interval_ms": args.interval_ms,
                      "python_ms": args.python_ms, "burn": args.burn, "cpus": os.cpu_count(),
                      "recv": _ms(recv_delays[skip:]), "loop": _ms(loop_delays[skip:]),
                      "put": _ms(list(put_times)[skip:])}))


if __name__ == "__main__":
    main()
