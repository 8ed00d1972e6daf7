"""Stop strings over streamed text: a piece is released only once no stop string can start inside it."""

from __future__ import annotations


class StopText:
    """Feed text pieces as they form; get back what may be shown. Text that could be the start of a stop string
    is held back until it either completes one (the output ends before it) or cannot any more."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text now safe to show; sets `stopped` when a stop string completed (it is not shown)."""
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """At the end of generation without a stop string: whatever was held back."""
        text, self.held = ("" if self.stopped else self.held), ""
        return text
