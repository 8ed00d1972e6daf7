"""Continuous batching of generation requests over slmkit's own runtime (used by slm serve, cascade
calibration and benchmarks): requests join and leave one running batch at token boundaries."""

from .engine import Busy, Engine, Event, Handle, Request
from .text import StopText

__all__ = ["Busy", "Engine", "Event", "Handle", "Request", "StopText"]
