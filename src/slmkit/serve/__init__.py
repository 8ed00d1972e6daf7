"""slm serve: an OpenAI-compatible server over slmkit's runtime with continuous batching.

    engine = Engine(model, tokenizer, max_active=8, max_queue=64)   # continuous batching (slmkit.batching)
    app = create_app(engine, ServeConfig(model_id="smollm2"))        # FastAPI app (app.py)
    ServerThread(app).start()                                         # uvicorn on a free loopback port
"""

from .app import ServeConfig, create_app
from ..batching import Busy, Engine, Event, Request
from .server import ServerThread, run

__all__ = ["Busy", "Engine", "Event", "Request", "ServeConfig", "ServerThread", "create_app", "run"]
