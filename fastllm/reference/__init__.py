"""Plain-PyTorch references, written for clarity: used by the tests, the benchmarks and
as the ``"reference"`` backend."""
