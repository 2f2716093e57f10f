"""What to send: endless, seeded streams of `RequestSpec`s for each `--workload`.

Lengths are approximate tokens. Synthetic text is random common English words: each is one token
(with its leading space) in Llama/GPT-style BPE vocabularies, so a prompt of N words is about N
tokens before the chat template. Natural text is estimated at 4 characters per token.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from rtserve.bench.config import BenchConfig

_WORDS = np.array((
    "the of and to in is was for on are with as his they be at one have this from or had by word "
    "but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see "
    "him two has look more day could go come did number sound no most people my over know water "
    "than call first who may down side been now find any new work part take get place made live "
    "where after back little only round man year came show every good me give our under name very "
    "through just form great think say help low line turn cause much mean before move right boy "
    "old too same tell does set three want air well also play small end put home read hand port "
    "large add even land here must big high such follow act why ask men change went light kind off "
    "need house picture try us again animal point mother world near build self earth father head "
    "stand own page should country found answer school grow study still learn plant cover food sun "
    "four between state keep eye never last let thought city tree cross farm hard start might story "
    "saw far sea draw left late run while press close night real life few north open seem together "
    "next white children begin got walk example paper group always music those both mark often "
    "letter until mile river car feet care second book carry took science eat room friend began idea "
    "fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl "
    "young ready above ever red list though feel talk bird soon body dog family leave song door black "
    "short class wind question happen ship area half rock order fire south problem piece told knew"
).split())
_CHARS_PER_TOKEN = 4
_LOGNORMAL_SIGMA = 0.6  # spread of --len-dist lognormal (its mean stays at the requested length)
_UNIFORM_RANGE = 0.5  # --len-dist uniform draws from [L*(1-r), L*(1+r)]


@dataclass(frozen=True)
class RtBudget:
    """The `rt` extension object a request carries (and the budget its class is judged against)."""

    rt_class: str  # firm | soft | batch
    ttft_ms: float | None = None
    itl_ms: float | None = None
    deadline_ms: float | None = None

    def to_wire(self) -> dict:
        wire: dict = {"class": self.rt_class}
        for key in ("ttft_ms", "itl_ms", "deadline_ms"):
            if getattr(self, key) is not None:
                wire[key] = getattr(self, key)
        return wire


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: chat messages (joined into one prompt for /v1/completions)."""

    index: int
    messages: tuple[dict, ...]
    max_tokens: int
    input_len_est: int  # approximate prompt tokens, used when the server sends no usage
    rt_class: str = "default"  # label for per-class reporting
    rt: RtBudget | None = None

    @property
    def prompt(self) -> str:
        return "\n\n".join(m["content"] for m in self.messages)


@cache
def load_prompt_data() -> dict:
    """The built-in prompt set shipped in rtserve/bench/data/chat_prompts.json."""
    text = resources.files("rtserve.bench").joinpath("data/chat_prompts.json").read_text("utf-8")
    return json.loads(text)


def synthetic_text(num_words: int, rng: np.random.Generator) -> str:
    return " ".join(rng.choice(_WORDS, size=num_words).tolist())


def sample_len(mean_len: int, dist: str, rng: np.random.Generator) -> int:
    """A length with mean ~`mean_len` from the fixed | uniform | lognormal distribution, >= 1."""
    if dist == "fixed":
        return mean_len
    if dist == "uniform":
        low, high = math.ceil(mean_len * (1 - _UNIFORM_RANGE)), math.floor(mean_len * (1 + _UNIFORM_RANGE))
        return max(1, int(rng.integers(low, high + 1)))
    if dist == "lognormal":
        mu = math.log(mean_len) - _LOGNORMAL_SIGMA**2 / 2  # E[X] = exp(mu + sigma^2/2) = mean_len
        return int(min(max(1, round(rng.lognormal(mu, _LOGNORMAL_SIGMA))), 10 * mean_len))
    raise ValueError(f"unknown length distribution {dist!r}")


def iter_workload(cfg: BenchConfig) -> Iterator[RequestSpec]:
    """Endless specs for `cfg.workload`; the same seed gives the same sequence in every phase."""
    rng = np.random.default_rng([cfg.seed, 0x30B])
    makers = {"synthetic": _synthetic, "chat": _chat, "shared-prefix": _shared_prefix,
              "realtime-mix": _realtime_mix, "long-prompt-interference": _interference}
    maker = makers[cfg.workload]
    index = 0
    while True:
        yield maker(cfg, index, rng)
        index += 1


def _user(text: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": text},)


def _estimate_tokens(text: str) -> int:
    return max(1, round(len(text) / _CHARS_PER_TOKEN))


def _synthetic(cfg: BenchConfig, index: int, rng: np.random.Generator) -> RequestSpec:
    input_len = sample_len(cfg.input_len, cfg.len_dist, rng)
    output_len = sample_len(cfg.output_len or 128, cfg.len_dist, rng)
    return RequestSpec(index, _user(synthetic_text(input_len, rng)), output_len, input_len)


def _pick_chat(rng: np.random.Generator, kinds: tuple[str, ...]) -> dict:
    entries = [e for e in load_prompt_data()["chat"] if e["kind"] in kinds]
    return entries[int(rng.integers(len(entries)))]


def _chat_spec(cfg: BenchConfig, index: int, entry: dict, rt_class: str = "default",
               rt: RtBudget | None = None) -> RequestSpec:
    max_tokens = cfg.output_len or entry["output_len"]
    return RequestSpec(index, _user(entry["prompt"]), max_tokens, _estimate_tokens(entry["prompt"]),
                       rt_class, rt)


def _chat(cfg: BenchConfig, index: int, rng: np.random.Generator) -> RequestSpec:
    return _chat_spec(cfg, index, _pick_chat(rng, ("short", "medium", "long")))


@cache
def shared_prefix_text(prefix_len: int) -> str:
    """A fixed (seed-independent) ~prefix_len-token system prompt, identical across runs."""
    head = ("You are the customer support assistant for Northwind Outfitters, an outdoor gear shop. "
            "Answer the customer's question briefly, using only the reference manual below.\n\n")
    body = synthetic_text(max(1, prefix_len - _estimate_tokens(head)), np.random.default_rng(1234))
    return head + "REFERENCE MANUAL\n" + body


def _shared_prefix(cfg: BenchConfig, index: int, rng: np.random.Generator) -> RequestSpec:
    questions = load_prompt_data()["shared_prefix_questions"]
    question = questions[int(rng.integers(len(questions)))]
    system = shared_prefix_text(cfg.prefix_len)
    messages = ({"role": "system", "content": system}, {"role": "user", "content": question})
    return RequestSpec(index, messages, cfg.output_len or 64,
                       cfg.prefix_len + _estimate_tokens(question))


def _long_summary(cfg: BenchConfig, index: int, rng: np.random.Generator, rt_class: str,
                  rt: RtBudget | None) -> RequestSpec:
    text = ("Summarise the following report in five bullet points.\n\n"
            + synthetic_text(cfg.long_input_len, rng))
    return RequestSpec(index, _user(text), cfg.long_output_len, cfg.long_input_len, rt_class, rt)


def interactive_budget(cfg: BenchConfig, rt_class: str) -> RtBudget:
    return RtBudget(rt_class, cfg.rt_ttft_ms, cfg.rt_itl_ms, cfg.rt_deadline_ms)


def _realtime_mix(cfg: BenchConfig, index: int, rng: np.random.Generator) -> RequestSpec:
    names = [name for name, _ in cfg.mix]
    shares = np.array([share for _, share in cfg.mix])
    rt_class = names[int(rng.choice(len(names), p=shares / shares.sum()))]
    if rt_class == "batch":
        return _long_summary(cfg, index, rng, "batch", RtBudget("batch"))
    entry = _pick_chat(rng, ("short", "medium"))
    return _chat_spec(cfg, index, entry, rt_class, interactive_budget(cfg, rt_class))


def _interference(cfg: BenchConfig, index: int, rng: np.random.Generator) -> RequestSpec:
    """Short interactive streams; every `long_every`-th request is a long prompt instead."""
    if index % cfg.long_every == cfg.long_every - 1:
        return _long_summary(cfg, index, rng, "long", RtBudget("batch"))
    entry = _pick_chat(rng, ("short",))
    spec = _chat_spec(cfg, index, entry, "short", interactive_budget(cfg, "soft"))
    return spec
