"""Training: the latent diffusion model and the autoencoder, with Lightning, from cached encodings.

``train.cache`` encodes a dataset once (latents of the flip variants, caption embeddings) into
``train.shards``, ``.npy`` parts read row by row;
``train.data`` turns the cache into step-indexed batches of latents and conditions;
``train.ldm`` trains the denoiser and writes a bundle; ``train.autoencoder`` trains or fine-tunes
the autoencoder; ``train.runtime`` holds what both share (run folders, atomic checkpoints, the trainer).
Import the sub-modules; this package keeps its own import light so that the CLI starts fast.
"""
