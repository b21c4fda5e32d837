"""refattn.analysis: measures what approximate attention costs in accuracy.

Approximation error, spectral rank of attention matrices, softmax-kernel fidelity and
the ``refattn report`` are planned (see the project's issues); this package is the place
they land. The references it will analyse are listed by :func:`refattn.mechanisms`.
"""
__all__: list[str] = []
from . import minilm  # noqa: E402,F401  (safetensors/tokenizers load lazily)

# --- issue #6: measures and sweeps (inputs, metrics, spectrum, kernel_fidelity, facts,
# sweep); loaded on first attribute access so importing the package stays light ---
_MEASURE_MODULES = ("inputs", "metrics", "spectrum", "kernel_fidelity", "facts", "sweep",
                    # issue #18: real attention, a real model, one cost axis, honest fits
                    "work", "fits", "tasks", "retrieval", "minilm_swap", "model_quality",
                    "real_attention", "state_sizes", "cost_axis", "real_sections",
                    "scaling_section")
__all__ += list(_MEASURE_MODULES)


def __getattr__(name):
    if name in _MEASURE_MODULES:
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
