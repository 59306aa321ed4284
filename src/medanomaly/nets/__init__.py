"""Plain ``nn.Module`` networks shared by the detectors (each takes ``spatial_dims`` 2 or 3)."""

from medanomaly.nets.autoencoders import ConvAutoencoder, VariationalAutoencoder

__all__ = ["ConvAutoencoder", "VariationalAutoencoder"]
