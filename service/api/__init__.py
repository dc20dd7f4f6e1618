"""The FastAPI service: ``create_app()`` builds it; ``hashaudit serve`` runs it."""

from service.api.app import create_app

__all__ = ["create_app"]
