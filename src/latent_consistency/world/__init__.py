"""The built-in toy text-to-image world: tokenizer, text encoder, VAE, teacher UNet, presets, build."""
