"""The ft lockstep engine."""

__version__ = "0.1.0"
