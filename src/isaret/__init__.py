"""isaret: transformer classifiers of isolated signs from landmark sequences."""

__version__ = "0.1.0"
