"""A cascade behind the API: the served (small) model answers; when its confidence — a quantile of its
answer's token log-probabilities (slmkit.collab.cascade) — is below the threshold, the request is answered by
the large model instead: a second local engine, or any OpenAI-compatible server (its URL)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from ..batching import Engine, Event
from ..errors import require


@dataclass
class CascadeRoute:
    threshold: float  # escalate when the small answer's confidence is below this (a log-probability, <= 0)
    quantile: float = 0.1
    engine: Engine | None = None  # the large model, local
    url: str | None = None  # ... or an OpenAI-compatible server: http://host:port (with or without /v1)
    model: str | None = None  # the model id to ask that server for (default: its first listed model)
    timeout_s: float = 60.0

    def validate(self) -> "CascadeRoute":
        require((self.engine is None) != (self.url is None), "a cascade needs one large model: local or a URL")
        require(-1e9 < self.threshold <= 0.0, f"the cascade threshold is a log-probability: in (-inf, 0], got "
                f"{self.threshold}")
        require(0.0 <= self.quantile <= 1.0, f"the confidence quantile must be in [0, 1], got {self.quantile}")
        require(self.timeout_s > 0, f"the cascade timeout must be positive, got {self.timeout_s}")
        if self.url is not None:
            require(self.url.startswith(("http://", "https://")), f"cascade URL must start with http:// or https://, "
                    f"got {self.url!r}")
            self.url = self.url.rstrip("/").removesuffix("/v1")
        return self


class UpstreamError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


async def ask_upstream(route: CascadeRoute, path: str, payload: dict) -> tuple[str, Event]:
    """POST the request to the large model's server (not streamed); its text and usage as a final Event."""
    try:
        async with httpx.AsyncClient(timeout=route.timeout_s) as client:
            if route.model is None:
                listed = (await client.get(route.url + "/v1/models")).json()
                route.model = listed["data"][0]["id"]
            r = await client.post(route.url + path, json={**payload, "model": route.model, "stream": False})
    except httpx.TimeoutException:
        raise UpstreamError(504, f"the cascade's large model at {route.url} did not answer within "
                            f"{route.timeout_s:g} s", "upstream_timeout") from None
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UpstreamError(502, f"the cascade's large model at {route.url} is unreachable or answered "
                            f"badly: {type(e).__name__}: {e}", "upstream_unreachable") from None
    return _parse(route, r)


def _parse(route: CascadeRoute, r: httpx.Response) -> tuple[str, Event]:
    try:
        body = r.json()
        if r.status_code != 200:
            raise UpstreamError(502, f"the cascade's large model at {route.url} answered {r.status_code}: "
                                f"{body.get('error', {}).get('message', body)}", "upstream_error")
        choice, usage = body["choices"][0], body.get("usage") or {}
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        return text, Event(done=True, finish_reason=choice.get("finish_reason") or "stop",
                           prompt_tokens=int(usage.get("prompt_tokens", 0)),
                           completion_tokens=int(usage.get("completion_tokens", 0)))
    except UpstreamError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise UpstreamError(502, f"the cascade's large model at {route.url} answered badly: {type(e).__name__}: "
                            f"{e}", "upstream_error") from None
