"""What a user brings: image folders, webdataset shards, the latent cache, and the data spec that names them."""
