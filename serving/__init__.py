"""Serving layer: the BentoML service and its request/response schemas."""
