import pytest

from engine.async_engine import AsyncEngine
from engine.engine_config import EngineConfig
from server.app import BackgroundServer, create_app
from server.serve_config import ServeConfig

DEMO_API_KEY = "demo-key"


@pytest.fixture(scope="session")
def demo_server():
    """A live server on the embedded demo model (needs `DEMO_API_KEY`), shared by the API-breadth
    tests (Anthropic Messages, Responses, structured outputs)."""
    engine = AsyncEngine(EngineConfig(model=None))
    server = BackgroundServer(create_app(engine, ServeConfig(api_keys=(DEMO_API_KEY,), keep_alive_interval=2.0)))
    server.start()
    yield server
    server.stop()
