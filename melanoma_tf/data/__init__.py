"""Readers for ISIC downloads, image checks and the synthetic dataset."""
