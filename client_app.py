"""Flower ClientApp entry point (``[tool.flwr.app.components] clientapp``)."""

from msfusion_flwr.apps import make_client_app

app = make_client_app()
