"""Errors shared by every part of instructloop."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot work, raised before anything starts; the message says which one
    and why."""
