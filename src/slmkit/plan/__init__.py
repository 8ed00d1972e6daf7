"""The constraint-first planner (issue 16). So far: the taxonomy it searches, as data (techniques.py)."""

from .techniques import CONSTRAINTS, STAGES, TECHNIQUES, Technique, techniques

__all__ = ["CONSTRAINTS", "STAGES", "TECHNIQUES", "Technique", "techniques"]
