"""The constraint-first planner: a device budget in, a measured model that meets it out (slmkit.plan.run.plan),
or the binding limit and the nearest achievable point. The search space is the technique table (techniques.py)."""

from .budget import Budget
from .run import PlanSettings, plan
from .techniques import CONSTRAINTS, STAGES, TECHNIQUES, Technique, techniques

__all__ = ["Budget", "CONSTRAINTS", "PlanSettings", "STAGES", "TECHNIQUES", "Technique", "plan", "techniques"]
