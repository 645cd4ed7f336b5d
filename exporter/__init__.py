"""Prometheus exporter for DCS online migration task progress."""

__version__ = "0.1.0"
