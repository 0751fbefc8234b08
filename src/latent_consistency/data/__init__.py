"""Datasets: the built-in toy world's `shapes` and `digits`, image folders, webdataset shards, latent cache."""
