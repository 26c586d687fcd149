"""Naive fine-tuning: the engine's standard loop and nothing else (the lower bound)."""

from __future__ import annotations


class NaivePlugin:
    """Fine-tune on each experience in turn; keeps nothing but the model."""
