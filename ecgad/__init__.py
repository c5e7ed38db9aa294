"""ecgad: ECG anomaly detection and localization with the Multi-scale Cross-restoration Framework (MCF)."""

__version__ = "0.1.0"
