"""FlexAttention mods written with torch: evaluating a caller's ``mask_mod`` /
``score_mod`` (and a score modifier's ``derivative``) on NumPy or on torch index arrays.

FlexAttention (Dong et al. 2024, "Flex Attention: A Programming Model for Generating
Optimized Attention Kernels") calls a mod on scalars under ``vmap``; refattn evaluates it
once per block on broadcast NumPy arrays: ``b``, ``h``, ``q_idx``, ``kv_idx`` int64
(e.g. ``()``, ``(G, 1, 1)``, ``(1, r, 1)``, ``(1, 1, c)``), for score mods the logits
``score`` float64 ``(G, r, c)``; the result broadcasts to their common shape. That is the
default: a mod of plain arithmetic (``q_idx >= kv_idx``,
``score - slope * abs(q_idx - kv_idx)``) that refers to nothing of torch runs on NumPy
alone. A mod written for torch often cannot: it calls ``torch.tanh``/``torch.where``,
uses tensor methods (``score.tanh()``) or combines a captured tensor with the indices
(``SLOPES[h] * (kv_idx - q_idx)``). :class:`ModEvaluator` evaluates such a mod on torch
tensors of the same values and shapes (CPU; indices int64, ``score`` float64) and
converts the result back to NumPy (bool for masks, a floating result to float64).

**When torch is used.** Whether a mod needs torch cannot be decided by looking at it
alone (it may call helpers, be a ``functools.partial`` or a callable object, or mention
torch yet be NumPy-valid), so it is decided by trying; a mod is pure, so evaluating it
twice is harmless. Looking only orders the tries:

1. NumPy first, unless torch is imported and the mod's code visibly refers to it (a
   global or closure variable it uses is a tensor, a torch function or module: ALiBi's
   slope tensor, ``torch.tanh``): then torch first. That spares such mods a failing
   NumPy try and the warnings NumPy gives when it meets a tensor.
2. If the first try raises, the other is made; torch only if it is in ``sys.modules``
   (the caller imported it; refattn never imports torch).
3. If a NumPy try *returns* a torch tensor (a captured tensor indexed by NumPy indices),
   the mod is evaluated again on torch tensors, so that all its arithmetic is torch's.
4. Later calls start with what served the last one (the sparse references call a mod
   once per tile).
5. If every try fails, the error names the mod, the argument shapes and each try's
   error; it has the type of the first try's error (the form the mod was presumably
   written for) and is chained to it.

Captured tensors must be on the CPU, as the index tensors are; one that requires grad
is fine (no gradient is recorded, results are detached).

>>> import numpy as np
>>> from refattn.boundary.torch_mods import ModEvaluator
>>> causal = ModEvaluator(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, "causal",
...                       "mask_mod")
>>> causal(np.asarray(0), np.asarray(0), np.arange(3)[:, None], np.arange(3)[None, :])
array([[ True, False, False],
       [ True,  True, False],
       [ True,  True,  True]])

With torch imported, a mod such as this ALiBi one is evaluated on torch tensors::

    SLOPES = torch.tensor([0.5, 0.25])
    def alibi(score, b, h, q_idx, kv_idx):
        return score - SLOPES[h] * (q_idx - kv_idx).abs()
    refattn.attention(q, k, v, bias=alibi)       # also mask=<torch-written mask_mod>
"""
from __future__ import annotations

import functools
import sys
import types

import numpy as np

__all__ = ["ModEvaluator", "to_numpy"]

#: Argument names of each kind of mod, for error messages.
_ARGS = {"mask_mod": ("b", "h", "q_idx", "kv_idx"),
         "score_mod": ("score", "b", "h", "q_idx", "kv_idx"),
         "derivative": ("score", "b", "h", "q_idx", "kv_idx")}
_LABEL = {"mask_mod": "mask_mod", "score_mod": "score_mod",
          "derivative": "derivative of score_mod"}


def _torch():
    """The caller's torch module, or None when it has not been imported."""
    return sys.modules.get("torch")


def _is_tensor(x) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def _is_torch_object(x, torch) -> bool:
    """A tensor, dtype, function, class or module of torch."""
    if x is torch or isinstance(x, (torch.Tensor, torch.dtype)):
        return True
    name = x.__name__ if isinstance(x, types.ModuleType) else getattr(x, "__module__", None)
    return isinstance(name, str) and name.partition(".")[0] == "torch"


def _mentions_torch(fn, torch) -> bool:
    """Whether ``fn`` (a function, or a ``functools.partial`` of one) visibly refers to
    torch: a global name its code uses, a closure variable or a bound argument is a
    torch object. A hint for the order of tries only."""
    if isinstance(fn, functools.partial):
        bound = [*fn.args, *fn.keywords.values()]
        return any(_is_torch_object(x, torch) for x in bound) or \
            _mentions_torch(fn.func, torch)
    code, scope = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
    if code is None or not isinstance(scope, dict):
        return False
    seen = [scope[n] for n in code.co_names if n in scope]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            seen.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return any(_is_torch_object(x, torch) for x in seen)


def to_numpy(out) -> np.ndarray:
    """A mod's result as a NumPy array: torch tensors are detached, moved to the host and
    floating ones converted to float64 (bool and integer tensors keep their dtype)."""
    torch = _torch()
    if torch is not None and isinstance(out, torch.Tensor):
        t = out.detach().cpu()
        if t.is_floating_point() and t.dtype != torch.float64:
            t = t.to(torch.float64)
        return t.numpy()
    return np.asarray(out)


class ModEvaluator:
    """Call a FlexAttention-style mod on NumPy arrays, or on torch tensors when it needs
    them (the rule is in the module docstring).

    ``fn``: the caller's function; ``name``: its name for messages (of the score mod,
    for a derivative); ``kind``: ``"mask_mod"`` (arguments ``b, h, q_idx, kv_idx``),
    ``"score_mod"`` or ``"derivative"`` (``score, b, h, q_idx, kv_idx``). Calling it
    with the NumPy arguments returns the result as a NumPy array (see
    :func:`to_numpy`); checking its dtype is the caller's business.

    >>> import numpy as np
    >>> soft = ModEvaluator(lambda s, b, h, q, k: 2 * np.tanh(s / 2), "cap", "score_mod")
    >>> soft(np.array([[0.0, 1.0]]), np.asarray(0), np.asarray(0), np.arange(1)[:, None],
    ...      np.arange(2)[None, :]).round(6)
    array([[0.      , 0.924234]])
    """

    def __init__(self, fn, name: str, kind: str):
        if kind not in _ARGS:
            raise ValueError(f"kind must be one of {sorted(_ARGS)}, got {kind!r}")
        self.fn, self.name, self.kind = fn, name, kind
        torch = _torch()
        try:
            hint = torch is not None and _mentions_torch(fn, torch)
        except Exception:  # an odd global (a mock, a proxy): no hint, the tries decide
            hint = False
        #: Whether torch is tried first (the mod refers to torch, or torch served it last).
        self.uses_torch = hint

    def __call__(self, *args) -> np.ndarray:
        tries = ["torch", "NumPy"] if self.uses_torch else ["NumPy", "torch"]
        failed = []
        for lib in tries:
            if lib == "torch" and _torch() is None:  # looked up now: the mod may import it
                continue
            try:
                out = self._in_torch(args) if lib == "torch" else self.fn(*args)
            except Exception as exc:
                failed.append((lib, exc))
                continue
            self.uses_torch = lib == "torch"
            if not self.uses_torch and _is_tensor(out):
                out = self._retry_in_torch(args, out)  # a tensor met NumPy indices
            return to_numpy(out)
        note = None if _torch() else "torch is not imported, so it was not tried"
        raise self._error(args, failed, note) from failed[0][1]

    def _retry_in_torch(self, args, mixed):
        """The torch evaluation, or the mixed result ``mixed`` when it fails."""
        try:
            out = self._in_torch(args)
        except Exception:
            return mixed
        self.uses_torch = True
        return out

    def _in_torch(self, args):
        """The mod on CPU torch tensors (copies of ``args``: ``score`` float64, indices
        int64), without recording gradients of captured tensors."""
        torch = _torch()
        first_index = 0 if self.kind == "mask_mod" else 1
        tensors = [torch.from_numpy(np.array(a, dtype=np.float64 if i < first_index
                                             else np.int64))
                   for i, a in enumerate(args)]
        with torch.no_grad():
            return self.fn(*tensors)

    def _error(self, args, attempts, note: str | None = None) -> Exception:
        """The exception for a mod that failed on every try: the first try's exception
        type (RuntimeError if that type cannot show a plain message)."""
        shapes = ", ".join(f"{n} {np.shape(a)}" for n, a in zip(_ARGS[self.kind], args))
        how = " and on ".join(f"{lib} {'tensors' if lib == 'torch' else 'arrays'}"
                           for lib, _ in attempts)
        lines = [f"{_LABEL[self.kind]} {self.name!r} failed on {how} ({shapes})"
                 + (f"; {note}" if note else "") + ":"]
        lines += [f"  {lib}: {type(e).__name__}: {e}" for lib, e in attempts]
        message = "\n".join(lines)
        try:
            err = type(attempts[0][1])(message)
        except Exception:
            return RuntimeError(message)
        # KeyError and the like show a repr of their argument; keep the message readable
        return err if str(err) == message else RuntimeError(message)
