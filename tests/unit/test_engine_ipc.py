"""The engine's zmq channels (rtserve/engine/ipc.py): every protocol message arrives as the same typed
dataclass it was (nested ones, tuples and infinite logprobs included), in order, and nothing else is
sent or accepted."""
import math
import queue
import threading
import time

import msgspec
import pytest
import zmq

from rtserve.engine.ipc import MESSAGE_TYPES, Channel
from rtserve.protocol import (EngineCoreAbort, EngineCoreFailed, EngineCoreOutput, EngineCoreOutputs,
                              EngineCorePause, EngineCoreReady, EngineCoreRequest, EngineCoreShutdown,
                              EngineStats, QueueSnapshot, RTParams, SpecDecodeStats, TokenLogprob)
from rtserve.sampling_params import SamplingParams, StructuredOutputs


@pytest.fixture
def pair(tmp_path):
    rx = Channel(f"ipc://{tmp_path}/c", sending=False)
    tx = Channel(f"ipc://{tmp_path}/c", sending=True)
    yield tx, rx
    tx.close()
    rx.close()


def messages():
    params = SamplingParams(temperature=0.5, top_p=0.9, max_tokens=7, stop=["\n\n"], stop_token_ids=[2],
                            logprobs=2, logit_bias={17: -100.0}, structured=StructuredOutputs("json", '{"type": "object"}'),
                            prediction=[5, 6])
    snap = QueueSnapshot(12.5, "deadline", 3, waiting=[((0, 13.0), 256), ((2, 1.5), 2049)], num_running=2,
                         running_prefills=[((1, 12.9), 40)], running_remaining_tokens=[3, 90],
                         cost_coeffs=(0.012, 0.0006, 0.0007, 0.0, 2.7, 0.011), cost_calibrated=True)
    stats = EngineStats(num_running=2, kv_usage=0.25, queue=snap, spec_decode=SpecDecodeStats("ngram", 4, 9, 5, [3, 2]))
    out = EngineCoreOutput("r1", [11, 12], [TokenLogprob(11, -math.inf, [11, 3], [-0.5, -math.inf])],
                           "stop", 12, num_prompt_tokens=5, error=None)
    return [EngineCoreRequest("r1", [1, 2, 3], params, 100.25, (0, 2), RTParams("firm", 0.5, 0.05, None)),
            EngineCoreAbort(["r1", "r2"]), EngineCorePause(["r3"], paused=True), EngineCoreShutdown(),
            EngineCoreOutputs([out, EngineCoreOutput("r2", [])], 101.5, stats),
            EngineCoreReady(49152, 8192, 712, 16, (0, 2)), EngineCoreFailed("boom")]


def test_every_message_type_arrives_as_it_was_sent_and_in_order(pair):
    tx, rx = pair
    sent = messages()
    assert {type(m) for m in sent} == set(MESSAGE_TYPES)
    for m in sent:
        tx.put(m)
    got = [rx.get(timeout=5.0) for _ in sent]
    assert got == sent
    assert all(type(a) is type(b) for a, b in zip(got, sent))
    assert got[0].sampling_params.structured == StructuredOutputs("json", '{"type": "object"}')
    assert got[4].stats.queue.waiting[0] == ((0, 13.0), 256)  # tuples, not lists
    assert got[4].outputs[0].new_logprobs[0].logprob == -math.inf


def test_an_empty_channel_raises_queue_empty_like_a_queue(pair):
    tx, rx = pair
    with pytest.raises(queue.Empty):
        rx.get_nowait()
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        rx.get(timeout=0.05)
    assert time.monotonic() - t0 >= 0.04
    tx.put(EngineCoreShutdown())
    assert rx.get(timeout=5.0) == EngineCoreShutdown()


def test_only_engine_messages_are_sent_and_accepted(pair, tmp_path):
    tx, rx = pair
    with pytest.raises(TypeError):
        tx.put({"request_id": "x"})
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.connect(f"ipc://{tmp_path}/c")
    raw.send_multipart([b"Popen", msgspec.msgpack.encode({"args": ["sh"]})])  # not a message type
    with pytest.raises(ValueError, match="unknown engine message type"):
        rx.get(timeout=5.0)
    raw.send_multipart([b"EngineCoreAbort", msgspec.msgpack.encode({"request_ids": 3})])  # wrong field type
    with pytest.raises(ValueError, match="unreadable EngineCoreAbort"):
        rx.get(timeout=5.0)
    raw.close(0)


def test_puts_from_several_threads_all_arrive(pair):
    tx, rx = pair
    threads = [threading.Thread(target=lambda k=k: [tx.put(EngineCoreAbort([f"{k}-{i}"])) for i in range(200)])
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [rx.get(timeout=5.0).request_ids[0] for _ in range(800)]
    assert sorted(got) == sorted(f"{k}-{i}" for k in range(4) for i in range(200))


def test_a_closed_process_transport_releases_its_sockets_on_the_reading_thread(monkeypatch):
    """After `kill`, the next `recv` (on the thread that reads) closes the receiving channel and says
    EOF; the sending channel and the socket directory are gone at once."""
    import os

    from rtserve.client import engine_transport
    from rtserve.config import EngineConfig

    class NoProcess:
        def __init__(self, *a, **kw):
            self.alive = False

        def start(self):
            pass

        def is_alive(self):
            return False

    monkeypatch.setattr(engine_transport.mp, "get_context", lambda method: type("Ctx", (), {"Process": NoProcess}))
    transport = engine_transport.ProcessTransport(EngineConfig())
    with pytest.raises(queue.Empty):
        transport.recv(0.01)
    transport.kill()
    assert not os.path.exists(transport._dir)
    for _ in range(2):
        with pytest.raises(EOFError):
            transport.recv(0.01)
    assert transport._out_closed
