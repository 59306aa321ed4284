"""Plain ``nn.Module`` networks shared by the detectors (each takes ``spatial_dims`` 2 or 3).

May import: ``errors``; never a detector, a data set or the training loop.
"""

from medanomaly.nets.autoencoders import ConvAutoencoder, VariationalAutoencoder
from medanomaly.nets.patch_embedding import PatchEmbedding
from medanomaly.nets.resnet_autoencoder import ResNetAutoencoder

__all__ = ["ConvAutoencoder", "PatchEmbedding", "ResNetAutoencoder", "VariationalAutoencoder"]
