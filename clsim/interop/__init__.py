"""Bridges to other continual-learning libraries (optional dependencies, imported lazily)."""
