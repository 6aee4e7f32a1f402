"""Wiring of sources, model and Redis: the Ray pipeline (issue 4) and, until it lands, the local demo."""
