"""Continuous batching of generation requests over slmkit's own runtime (used by slm serve, cascade
calibration and benchmarks): requests join and leave one running batch at token boundaries."""

from .draft import BatchDraftModel
from .engine import Busy, Engine, Event, Handle, Request
from .text import StopText

__all__ = ["BatchDraftModel", "Busy", "Engine", "Event", "Handle", "Request", "StopText"]
