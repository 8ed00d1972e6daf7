"""SLM <-> LLM collaboration: a small model drafting for a larger one (speculative decoding) and answering for
it when confident (cascades)."""

from .speculative import Cached, DraftModel, PromptLookup, SpecStats, load_draft, make_drafter, speculative_generate, verify

__all__ = ["Cached", "DraftModel", "PromptLookup", "SpecStats", "load_draft", "make_drafter", "speculative_generate", "verify"]
