"""refattn.analysis: measures what approximate attention costs in accuracy.

Approximation error, spectral rank of attention matrices, softmax-kernel fidelity and
the ``refattn report`` are planned (see the project's issues); this package is the place
they land. The references it will analyse are listed by :func:`refattn.mechanisms`.
"""
__all__: list[str] = []
from . import minilm  # noqa: E402,F401  (safetensors/tokenizers load lazily)
