"""skullrec: 3D skull shape reconstruction with a relative-flatness (FAM) regularised autoencoder."""

__version__ = "0.1.0"
