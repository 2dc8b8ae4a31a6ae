"""recontrast: ReContrast visual anomaly detection, from normal images to a registered model."""

__version__ = "0.1.0"
