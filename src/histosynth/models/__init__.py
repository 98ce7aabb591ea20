"""The model parts: autoencoder (with the discriminator and perceptual loss of its training), denoiser,
diffusion objective, and CompVis checkpoint import.

Import from the sub-modules (``histosynth.models.autoencoder`` ...); this package keeps its own import
light so that the CLI starts fast.
"""
