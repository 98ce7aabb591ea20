"""How long ``import histosynth`` takes, and what a first model costs on top: the public API loads lazily.

Prints ``name value unit`` lines, each the median of fresh interpreters (``--runs``, default 5):

* ``import_histosynth_ms``: ``import histosynth`` alone (torch, numpy and the API module stay unloaded).
* ``import_histosynth_api_ms``: ``import histosynth.api`` (numpy, PIL, the schema and captions; no torch).
* ``load_model_s``: ``histosynth.load_model(device="cpu")`` of the shipped model, imports of torch,
  diffusers and transformers included (paid once per process, on first use).

Run (from the repository root)::

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/import_time.py

Measured on the 2-core CPU machine (other jobs running: load average about 5), ``--runs 9``::

    import_histosynth_ms 11.8 ms
    import_histosynth_api_ms 1182 ms
    load_model_s 28.9 s

The first line is interpreter noise at that load: medians of 15 fresh interpreters, alternated on
the same machine, gave 7.3 and 7.6 ms for ``import histosynth`` before the API (``__init__.py``
held only ``__version__``) and 8.0 and 12.3 ms after. The API module costs its second, the first
time a name of ``histosynth`` is used; the model load is mostly importing torch, diffusers and
transformers.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

TIMED = "import time; t = time.perf_counter(); {code}; print(time.perf_counter() - t)"


def seconds(code: str, runs: int) -> float:
    """The median wall time of ``code`` in ``runs`` fresh interpreters."""
    times = [float(subprocess.run([sys.executable, "-c", TIMED.format(code=code)], capture_output=True, text=True,
                                  check=True).stdout.split()[-1]) for _ in range(runs)]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    print(f"import_histosynth_ms {1000 * seconds('import histosynth', runs):.1f} ms")
    print(f"import_histosynth_api_ms {1000 * seconds('import histosynth.api', runs):.0f} ms")
    load = "import histosynth; histosynth.load_model(device='cpu')"
    print(f"load_model_s {seconds(load, 1):.1f} s")


if __name__ == "__main__":
    main()
