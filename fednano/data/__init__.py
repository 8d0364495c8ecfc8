"""Datasets, prompts and federated partitions."""
