"""``python -m histosynth``: the command line, also as launchers start it (``torchrun ... -m histosynth --
generate``, Lightning's DDP re-running ``python -m histosynth`` once per device)."""

from .cli import run

if __name__ == "__main__":
    run()
