"""Data: the renal phantom, slides, tiling and the patch-dataset format."""
