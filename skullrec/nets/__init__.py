"""The autoencoder and its safe checkpoints."""
