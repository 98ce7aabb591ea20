"""``python -m histosynth``: the command line, as torchrun starts it (``torchrun ... -m histosynth -- generate``)."""

from .cli import run

if __name__ == "__main__":
    run()
