"""The web app's support, beside app.py: the engine's lifecycle (service.py) and the figures (plots.py)."""
