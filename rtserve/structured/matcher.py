"""A request's grammar state in the engine, and the batch's token bitmask in the sampler.

`RequestGrammar` follows the tokens a request emits (`accept`). Each step, `fill_masks` fills one
bitmask row per constrained logits row and `apply_masks` sets every token the grammar forbids to
-inf before sampling; unconstrained rows are never touched. For a verify step, a request's rows predict its next token
and then the token after each draft: the matcher is advanced through the drafts to fill those rows
and rolled back afterwards, so a draft the grammar forbids is rejected like any other mismatch.
The runner fills the batch's bitmask on a worker thread while the forward pass runs (`fill_masks`;
the matchers are not touched by anything else until it is joined) and applies it after.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from torch import Tensor

GRAMMAR_TIMEOUT_S = 30.0  # a compile still running this long after the first sample fails the request


class RequestGrammar:
    """The matcher of one request, built once its compiled grammar is ready."""

    def __init__(self, compiled: Future, stop_token_ids: tuple[int, ...]) -> None:
        self._compiled = compiled
        self._stop_token_ids = list(stop_token_ids)
        self._matcher = None
        self.is_held = False  # paused by the engine until the compile is done (rtserve/engine/request_drafts.py)

    @property
    def error(self) -> str | None:
        """The compile's error message, once it has failed."""
        if self._compiled.done() and self._compiled.exception() is not None:
            return str(self._compiled.exception()).strip()[-300:]
        return None

    def wait(self) -> bool:
        """Wait for the compile; False if it failed (the engine then fails the request, see `error`)."""
        try:
            self.matcher
        except Exception:  # noqa: BLE001 - reported through `error`
            return False
        return True

    @property
    def matcher(self) -> Any:
        """Waits for the compile (normally done during the prefill); raises its error."""
        if self._matcher is None:
            import xgrammar as xgr
            compiled = self._compiled.result(timeout=GRAMMAR_TIMEOUT_S)
            self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=self._stop_token_ids or None)
        return self._matcher

    def accept(self, token_ids: list[int]) -> bool:
        """Advance over emitted tokens; False if the grammar refuses one. Tokens after the grammar has
        ended (a verify step may emit past the stop token) are ignored: the request stops there."""
        matcher = self.matcher
        for t in token_ids:
            if matcher.is_terminated():
                break
            if not matcher.accept_token(t):
                return False
        return True

    @property
    def is_ready(self) -> bool:
        """Compiled (without waiting) and not failed."""
        return self._matcher is not None or (self._compiled.done() and self._compiled.exception() is None)

    def jump_forward_tokens(self) -> list[int]:
        """Tokens spelling the text the grammar forces next (empty when it allows a choice)."""
        matcher = self.matcher
        return [] if matcher.is_terminated() else matcher.find_jump_forward_tokens()

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()

    def fill(self, bitmask: Tensor, first_row: int, draft_ids: list[int]) -> None:
        """Rows first_row .. first_row + len(draft_ids) of `bitmask`: the next token's mask, then the
        mask after each draft. Past a draft the grammar refuses, rows repeat the last mask (those
        rows' tokens are discarded with the refused draft). The matcher ends where it started."""
        matcher = self.matcher
        matcher.fill_next_token_bitmask(bitmask, first_row)
        num_accepted = 0
        for j, token_id in enumerate(draft_ids):
            if num_accepted == j and not matcher.is_terminated() and matcher.accept_token(token_id):
                num_accepted += 1
                matcher.fill_next_token_bitmask(bitmask, first_row + j + 1)
            else:
                bitmask[first_row + j + 1] = bitmask[first_row + j]
        if num_accepted:
            matcher.rollback(num_accepted)


@dataclass
class BatchMask:
    """The step's grammar bitmask: filled before (or while) the forward runs, applied to its logits."""

    bitmask: Tensor | None  # [R, ceil(V / 32)] int32 on the CPU; None: no constrained row
    rows: list[int]  # the constrained logits rows
    failed: set[str]  # requests whose grammar failed to compile (no rows)


def fill_masks(seqs: list[Any], vocab_size: int) -> BatchMask:
    """One bitmask row per logits row of a constrained sequence. `seqs` are the step's sampled
    sequences in logits-row order; each has 1 + len(spec_token_ids) rows (waits for compiles)."""
    grammars, failed, row = [], set(), 0
    for seq in seqs:
        grammar = seq.request.grammar
        if grammar is not None:
            if grammar.wait():
                grammars.append((row, grammar, list(seq.spec_token_ids)))
            else:
                failed.add(seq.request.request_id)
        row += len(seq.spec_token_ids) + 1
    if not grammars:
        return BatchMask(None, [], failed)
    import xgrammar as xgr
    bitmask = xgr.allocate_token_bitmask(row, vocab_size)  # all allowed
    rows: list[int] = []
    for first_row, grammar, drafts in grammars:
        grammar.fill(bitmask, first_row, drafts)
        rows.extend(range(first_row, first_row + len(drafts) + 1))
    return BatchMask(bitmask, rows, failed)


def apply_masks(logits: Tensor, mask: BatchMask) -> None:
    """Forbidden tokens of the constrained rows to -inf (modifies `logits` [R, V])."""
    if mask.bitmask is None:
        return
    import xgrammar as xgr
    vocab_size = logits.shape[-1]
    if logits.device.type == "cpu":
        xgr.apply_token_bitmask_inplace(logits, mask.bitmask, vocab_size=vocab_size, indices=mask.rows,
                                        backend="cpu")
    else:  # xgrammar's default GPU kernel needs triton, which rtserve does not install: plain torch ops
        xgr.apply_token_bitmask_inplace(logits, mask.bitmask.to(logits.device, non_blocking=True),
                                        vocab_size=vocab_size, indices=mask.rows, backend="torch_native")
