"""Continuous batching with chunked prefill and preemption by recompute.

Each step has a token budget shared by every running sequence: a decode costs one token, a prompt
costs as many tokens as fit (the rest comes next step). Running requests are served first, in
order; then waiting requests are admitted (with their prefix-cache hit) while budget, sequence slots
and KV blocks allow. When blocks run out, a victim chosen by `pick_victim` is preempted: its blocks
are freed and it returns to the front of the waiting queue to be recomputed later (its generated
tokens are kept and become part of the recomputed prefix). A waiting request that does not fit may
have running requests preempted to make room for it, if the policy names them (`victims_for`).

Real-time decisions are not made here: a policy object (rtserve/engine/rt_policy.py) orders the
waiting and running requests, says which waiting request goes before a running prefill, returns each
step's prefill plan (`StepPlan`: tokens and predicted time, spent here chunk by chunk), agrees to each
admission, picks victims and names requests whose deadline passed (`expire`). Paused requests (a slow
reader) keep their blocks but are not scheduled; so do the decodes the plan sets aside for the step
(`StepPlan.held_ids`; `yield_ids` only when one of the prompts they yield to has a chunk in it), unless
the step would be empty.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterable

from rtserve.config import SchedulerConfig
from rtserve.engine.request import Request, RequestStatus
from rtserve.engine.rt_policy import FCFSPolicy, StepPlan
from rtserve.engine.scheduler_output import RunnerOutput, ScheduledSeq, SchedulerOutput
from rtserve.engine.stop_check import check_stop
from rtserve.kv.manager import KVCacheManager
from rtserve.protocol import EngineCoreOutput, FinishReason


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 policy=None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.policy = policy or FCFSPolicy()
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        now = self.clock()
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for req in self.waiting:
            req.num_prefix_hit_tokens = self.kv.get_computed_blocks(req)[1]
        self.policy.order(self.running, self.waiting, now)
        # Prefill chunks share the token budget with decodes and are further capped by the policy's plan.
        plan = self.policy.plan_step(self.running, self.waiting, now, budget)
        prefill_budget = plan.prefill_token_budget
        budget, prefill_budget, deferred = self._schedule_running(out, plan, budget, prefill_budget, now)
        if not out.preempted_ids:
            budget, prefill_budget = self._admit_waiting(out, plan, budget, prefill_budget, now)
        budget = self._schedule_deferred(out, plan, deferred, budget, prefill_budget)
        if plan.yield_ids and not any(s.request.request_id in plan.yield_to_ids for s in out.seqs):
            budget = self._schedule_decodes(out, plan.yield_ids, budget)  # no prompt they yield to runs
        if not out.seqs and not out.preempted_ids:
            self._schedule_decodes(out, plan.held_ids, budget)  # held for nothing that runs: never an empty step
        self._schedule_drafts(out, self.config.max_num_batched_tokens - out.num_scheduled_tokens)
        return out

    def _schedule_running(self, out: SchedulerOutput, plan: StepPlan, budget: int, prefill_budget: int,
                          now: float) -> tuple[int, int, list[Request]]:
        """Schedule running requests in order, preempting for blocks as needed.

        A prefill chunk the policy ranks after the first waiting request is deferred (returned) so
        that admission goes first; it gets what the budget has left afterwards.
        """
        head = next((r for r in self.waiting if not r.is_paused), None)
        deferred: list[Request] = []
        idx = 0
        while idx < len(self.running) and budget > 0:
            req = self.running[idx]
            num_remaining = req.num_tokens - req.num_computed_tokens
            if req.is_paused or req.request_id in plan.held_ids or req.request_id in plan.yield_ids:
                idx += 1
                continue
            if num_remaining > 1 and head is not None and self.policy.runs_first(head, req, now):
                deferred.append(req)
                idx += 1
                continue
            num_new = self._chunk(plan, req, num_remaining, budget, prefill_budget)
            if num_new <= 0:
                idx += 1
                continue
            if not self._allocate_or_preempt(req, num_new, idx, out, now):
                continue  # req itself was preempted; running[idx] is now the next one
            out.seqs.append(ScheduledSeq(req, req.num_computed_tokens, num_new, self.kv.block_ids(req.request_id)))
            if num_remaining > 1:
                plan.spend(req, req.num_computed_tokens, num_new)
            budget -= num_new
            prefill_budget -= num_new if num_new > 1 else 0
            idx += 1
        return budget, prefill_budget, deferred

    def _schedule_deferred(self, out: SchedulerOutput, plan: StepPlan, deferred: list[Request], budget: int,
                           prefill_budget: int) -> int:
        """Prefill chunks deferred behind admission, with the budget left (never preempts); returns the
        token budget left."""
        for req in deferred:
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted to make room meanwhile
            num_new = self._chunk(plan, req, req.num_tokens - req.num_computed_tokens, budget, prefill_budget)
            if num_new <= 0 or not self.kv.allocate_slots(req, num_new):
                continue
            out.seqs.append(ScheduledSeq(req, req.num_computed_tokens, num_new, self.kv.block_ids(req.request_id)))
            plan.spend(req, req.num_computed_tokens, num_new)
            budget -= num_new
            prefill_budget -= num_new
        return budget

    def _schedule_decodes(self, out: SchedulerOutput, request_ids: frozenset[str], budget: int) -> int:
        """The decodes of these running requests that the plan set aside, with the budget left (never
        preempts); returns the token budget left."""
        for req in self.running:
            if budget <= 0:
                break
            if (req.request_id not in request_ids or req.is_paused
                    or req.num_tokens - req.num_computed_tokens != 1 or not self.kv.allocate_slots(req, 1)):
                continue
            out.seqs.append(ScheduledSeq(req, req.num_computed_tokens, 1, self.kv.block_ids(req.request_id)))
            budget -= 1
        return budget

    def _schedule_drafts(self, out: SchedulerOutput, budget: int) -> None:
        """Extend scheduled decodes by their draft tokens with the budget left over (never preempts).

        Every decode and prefill chunk is placed first, so speculation only uses spare tokens.
        """
        for seq in out.seqs:
            req = seq.request
            if budget <= 0:
                break
            if not req.spec_token_ids or seq.num_new_tokens != 1 or not seq.do_sample:
                continue
            num_spec = min(len(req.spec_token_ids), budget)
            if not self.kv.allocate_slots(req, 1 + num_spec):
                continue
            seq.spec_token_ids = req.spec_token_ids[:num_spec]
            seq.spec_probs = None if req.spec_probs is None else req.spec_probs[:num_spec]
            seq.num_new_tokens += num_spec
            seq.block_ids = self.kv.block_ids(req.request_id)
            budget -= num_spec

    def _chunk(self, plan: StepPlan, req: Request, num_remaining: int, budget: int, prefill_budget: int) -> int:
        """Tokens to compute this step: a decode (1) always fits the budget; a prefill chunk is capped
        by the budgets, the plan's fixed share for `req` if it has one, and what fits the plan's time."""
        if num_remaining == 1:
            return min(1, budget)
        num = min(num_remaining, budget, max(prefill_budget, 0))
        cap = plan.max_chunk_tokens(req)
        if cap is not None:
            num = min(num, cap)
        limit = self.config.long_prefill_token_threshold
        num = min(num, limit) if limit > 0 else num
        return plan.chunk_tokens(req, req.num_tokens - num_remaining, num) if num > 0 else num

    def _allocate_or_preempt(self, req: Request, num_new: int, idx: int, out: SchedulerOutput,
                             now: float) -> bool:
        """Allocate for `req`, preempting unscheduled running requests (running[idx:]) as needed."""
        while not self.kv.allocate_slots(req, num_new):
            victim = self.policy.pick_victim(self.running[idx:], now)
            self._preempt(victim)
            out.preempted_ids.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self.running.remove(req)
        req.num_computed_tokens = 0
        req.spec_token_ids, req.spec_probs = [], None
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _admit_waiting(self, out: SchedulerOutput, plan: StepPlan, budget: int, prefill_budget: int,
                       now: float) -> tuple[int, int]:
        """Admit waiting requests in the policy's order while slots, blocks and budget allow.

        A request that does not fit may have the policy's victims preempted to make room for it (never
        one admitted this step); otherwise only requests that may make room for themselves (the
        policy names victims for them: on-time firm ones) pass it, so the order is otherwise kept and
        a starving batch request that cannot fit does not hold a firm arrival back. Returns the
        (token, prefill token) budget left.
        """
        admitted: list[Request] = []
        blocked = False
        for req in list(self.waiting):
            if budget <= 0:
                break
            if req.is_paused or (blocked and not self.policy.victims_for(req, self.running, now)):
                continue
            hit_blocks, num_cached = self.kv.get_computed_blocks(req)
            num_new = self._chunk(plan, req, req.num_tokens - num_cached, budget, prefill_budget)
            if num_new <= 0:
                break
            if not self._fits(req, num_new, hit_blocks, self.running, now):
                refund = self._make_room(req, num_new, hit_blocks, admitted, out, now)
                if refund is None:
                    blocked = True  # only a request that may make room (an on-time firm one) passes it
                    continue
                budget, prefill_budget = budget + refund[0], prefill_budget + refund[1]
                hit_blocks, num_cached = self.kv.get_computed_blocks(req)
                num_new = self._chunk(plan, req, req.num_tokens - num_cached, budget, prefill_budget)
            if not self.kv.allocate_slots(req, num_new, hit_blocks):
                break
            self.waiting.remove(req)
            req.num_computed_tokens = num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            admitted.append(req)
            out.seqs.append(ScheduledSeq(req, num_cached, num_new, self.kv.block_ids(req.request_id)))
            if req.num_tokens - num_cached > 1:
                plan.spend(req, num_cached, num_new)
            budget -= num_new
            prefill_budget -= num_new if num_new > 1 else 0
        return budget, prefill_budget

    def _fits(self, req: Request, num_new: int, hit_blocks: list, running: list[Request], now: float,
              num_blocks_freed: int = 0) -> bool:
        """A sequence slot (the policy agreeing) and KV blocks for `req`'s first chunk, beside `running`."""
        return (len(running) < self.config.max_num_seqs and self.policy.can_admit(req, running, now)
                and self.kv.num_blocks_short(req, num_new, hit_blocks) <= num_blocks_freed)

    def _make_room(self, req: Request, num_new: int, hit_blocks: list, admitted: list[Request],
                   out: SchedulerOutput, now: float) -> tuple[int, int] | None:
        """Preempt the fewest of the policy's victims for `req` that make it fit; None if none would.

        Victims scheduled this step are taken out of `out`: returns the (token, prefill token) budget
        they had, to give back.
        """
        victims = [v for v in self.policy.victims_for(req, self.running, now) if v not in admitted]
        remaining, freed, chosen = list(self.running), 0, []
        for victim in victims:
            if self._fits(req, num_new, hit_blocks, remaining, now, freed):
                break
            chosen.append(victim)
            remaining.remove(victim)
            freed += self.kv.num_reclaimable_blocks(victim)
        if not chosen or not self._fits(req, num_new, hit_blocks, remaining, now, freed):
            return None
        num_tokens = num_prefill = 0
        for victim in chosen:
            for seq in [s for s in out.seqs if s.request is victim]:
                out.seqs.remove(seq)
                num_tokens += seq.num_new_tokens
                num_prefill += seq.num_new_tokens if seq.num_new_tokens > 1 else 0
            self._preempt(victim)
            out.preempted_ids.append(victim.request_id)
        return num_tokens, num_prefill

    def expire(self) -> list[EngineCoreOutput]:
        """Finish (FinishReason.DEADLINE) every request the policy says became late; frees blocks at once."""
        now = self.clock()
        outputs = []
        for req, error in self.policy.expired([*self.waiting, *self.running], now):
            outputs.extend(self.finish_requests([req.request_id], FinishReason.DEADLINE, error))
        return outputs

    def set_paused(self, request_ids: Iterable[str], paused: bool) -> None:
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                req.is_paused = paused

    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Advance token counts, append sampled tokens, finish stopped requests."""
        outputs = []
        now = self.clock()
        for seq in sched.seqs:
            req = seq.request
            if req.is_finished:
                continue  # aborted between schedule and update
            req.spec_token_ids, req.spec_probs = [], None
            token_ids = result.spec_token_ids.get(req.request_id)
            if token_ids is None:
                token_id = result.sampled_token_ids.get(req.request_id)
                token_ids = None if token_id is None else [token_id]
            # Drafts after the first rejected one were computed but are not part of the sequence:
            # progress covers the accepted ones only, and their KV slots are overwritten next step.
            num_rejected = len(seq.spec_token_ids) - (len(token_ids) - 1 if token_ids else 0)
            req.num_computed_tokens += seq.num_new_tokens - num_rejected
            if token_ids is None:
                self.kv.cache_blocks(req)
                continue
            late = self.policy.late_token(req, now)
            if late is not None:  # a firm token past its deadline is never delivered
                outputs.extend(self.finish_requests([req.request_id], FinishReason.DEADLINE, late))
                continue
            outputs.append(self._append_tokens(req, token_ids, result.logprobs.get(req.request_id), now))
        return outputs

    def _append_tokens(self, req: Request, token_ids: list[int], logprobs, now: float) -> EngineCoreOutput:
        """Append tokens up to the first stop; finish the request if one stops it."""
        finish_reason = stop_reason = None
        num_appended = 0
        for token_id in token_ids:
            req.append_output_token(token_id, now)
            num_appended += 1
            finish_reason, stop_reason = check_stop(req, self.max_model_len)
            if finish_reason is not None:
                break
        # A stop inside the accepted drafts leaves computed KV past the sequence's new end.
        req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
        self.kv.cache_blocks(req)
        out = self._output(req, token_ids[:num_appended], logprobs[:num_appended] if logprobs else None)
        if finish_reason is not None:
            self._finish(req, finish_reason, stop_reason, out)
        return out

    def finish_requests(self, request_ids: Iterable[str], reason: str,
                        error: str | None = None) -> list[EngineCoreOutput]:
        """Abort or fail requests wherever they are; frees their blocks at once."""
        outputs = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status is RequestStatus.WAITING:
                self.waiting.remove(req)
            out = self._output(req, [], None)
            out.error = error
            self._finish(req, reason, None, out)
            outputs.append(out)
        return outputs

    def _finish(self, req: Request, reason: str, stop_reason, out: EngineCoreOutput) -> None:
        if req in self.running:
            self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason, req.stop_reason = reason, stop_reason
        out.finish_reason, out.stop_reason = reason, stop_reason
        del self.requests[req.request_id]

    @staticmethod
    def _output(req: Request, token_ids: list[int], logprobs) -> EngineCoreOutput:
        return EngineCoreOutput(
            request_id=req.request_id, new_token_ids=token_ids, new_logprobs=logprobs,
            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=max(req.num_cached_tokens, 0),
            num_preemptions=req.num_preemptions)


__all__ = ["Scheduler", "FinishReason"]
