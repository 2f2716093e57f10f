"""Speculative decoding: draft-token proposers (n-gram prompt lookup, draft model), acceptance
tracking (acceptance.py) and the adaptive k chooser (adaptive.py), and the Speculator that bundles
them for the engine.

Verification (greedy matching, exact rejection sampling) lives in rtserve/sample/rejection.py.
The draft model (draft_model.py) is imported on demand: it pulls in the model code.
"""
from rtserve.spec.acceptance import AcceptanceTracker
from rtserve.spec.adaptive import SpecLengthChooser, StepTimeTable
from rtserve.spec.proposer import NgramProposer, Proposal, Proposer, SpecRequest, ngram_lookup
from rtserve.spec.speculator import Speculator, build_speculator

__all__ = ["AcceptanceTracker", "NgramProposer", "Proposal", "Proposer", "SpecLengthChooser", "SpecRequest",
           "Speculator", "StepTimeTable", "build_speculator", "ngram_lookup"]
