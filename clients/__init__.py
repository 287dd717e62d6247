"""The hospital side: the Flower ClientApp, site data loading and local training."""
