"""Multi-task ECG analysis with an ensemble of frozen foundation models, as a cached pipeline."""

__version__ = "0.1.0"
