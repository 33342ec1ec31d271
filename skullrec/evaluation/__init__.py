"""Segmentation metrics and folder-level evaluation."""
