"""HeadHunter head search (Ahn et al. 2025, arXiv:2506.10978): pick the self-attention heads to
perturb for `HeadPerturbation` guidance by a pluggable image scorer.

    from attnctrl.heads import search_heads
    result = search_heads(pipe, ["a cat"], seeds=[0, 1], scorer="sharpness", rounds=3, top_k=4)
    result.to_json("heads.json")           # HeadPerturbation(heads="heads.json") loads it
"""
from .scorers import SCORERS, get_scorer, register_scorer, scorer_id
from .search import HeadSearchResult, candidate_heads, evaluate_heads, model_fingerprint, search_heads

__all__ = [
    "SCORERS", "HeadSearchResult", "candidate_heads", "evaluate_heads", "get_scorer", "model_fingerprint",
    "register_scorer", "scorer_id", "search_heads",
]
