"""Prediction on any input grid and surface meshes."""
