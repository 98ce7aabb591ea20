"""``python -m histosynth``, as the ``histosynth`` command (and ``torchrun -m histosynth``)."""

from .cli import run

if __name__ == "__main__":
    run()
