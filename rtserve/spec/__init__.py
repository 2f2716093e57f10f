"""Speculative decoding: draft-token proposers (n-gram prompt lookup, draft model) and the k chooser.

Verification (greedy matching, exact rejection sampling) lives in rtserve/sample/rejection.py.
"""
from rtserve.spec.adaptive import AcceptanceTracker, SpecLengthChooser
from rtserve.spec.proposer import NgramProposer, Proposal, Proposer, SpecRequest, ngram_lookup

__all__ = ["AcceptanceTracker", "NgramProposer", "Proposal", "Proposer", "SpecLengthChooser", "SpecRequest",
           "ngram_lookup"]
