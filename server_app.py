"""Flower ServerApp entry point (``[tool.flwr.app.components] serverapp``)."""

from msfusion_flwr.apps import make_server_app

app = make_server_app()
