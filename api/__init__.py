"""Read API over the ingested data: ``create_app(engine_or_url, api_key)``; run with ``python -m api``."""

from api.app import create_app

__all__ = ["create_app"]
