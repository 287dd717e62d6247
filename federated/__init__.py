"""MultiMed-FL: federated learning across simulated hospital sites on the MultiMed benchmark."""

__version__ = "0.1.0"
