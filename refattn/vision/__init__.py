r"""Vision attention on grids of tokens: windows (Swin), shifted windows, neighborhood
attention (NATTEN), spatial-reduction attention (PVT), patch merging, and global (CLS)
tokens added to any of them.

One module per concept: :mod:`.neighborhood`, :mod:`.windows` (regular and shifted
windows), :mod:`.spatial_reduction`, :mod:`.patch_merging`, :mod:`.drawing`
(:func:`draw_query_pixel`); the grid masks, the global tokens and the grid input
checks they share are in ``_common``.

**Layout.** Inputs are grids of tokens, heads first: ``q: (..., Hq, *S, D)``,
``k: (..., Hkv, *S, D)``, ``v: (..., Hkv, *S, Dv)`` with ``S = (X, Y)`` for images,
``(X,)`` for sequences and ``(T, X, Y)`` for video; GQA and leading batch dimensions as
everywhere in refattn. The number of spatial dimensions is the length of the window /
kernel / ratio tuple; a plain ``int`` means the same size on both axes of a 2-D grid.
Outputs are ``(..., Hq, *S, Dv)`` float64.

**Flattened form.** Windows, shifted windows and neighborhoods are masks over the grid
flattened in row-major (C) order, token ``t = x * Y + y`` for an ``(X, Y)`` grid, and
each of these mechanisms equals dense ``refattn.attention`` on the flattened sequence
under its mask (spatial reduction is dense attention to the pooled keys instead):

.. math:: o_t = \sum_{u \in S(t)} \frac{e^{s_{tu}}}{\sum_{u' \in S(t)} e^{s_{tu'}}} v_u,
          \qquad S(t) = \{u : \text{mask}(t, u)\}.

The masks (:func:`neighborhood_mask`, :func:`window_mask`, :func:`shifted_window_mask`,
:func:`with_global`) are :class:`refattn.masks.Mask` objects with an analytic tile
classification (a tile of flattened indices is bounded, per axis, by the rows/columns it
covers), so the mechanisms run through :func:`refattn.sparse_attention` in time and
memory proportional to the kept pairs, ``O(N k^d)``, never ``O(N^2)``.

**Global (CLS) tokens.** ``cls_tokens=(q_cls, k_cls, v_cls)`` with shapes
``(..., Hq, G, D)``, ``(..., Hkv, G, D)``, ``(..., Hkv, G, Dv)`` adds ``G`` tokens that
attend to every token and are attended by every token. In the flattened form they come
first: the sequence is ``[cls_0 .. cls_{G-1}, grid tokens]`` and the mask is
``with_global(pattern, G)``. The mechanisms then return ``(out, out_cls)`` (and with
``return_lse``: ``(out, lse, out_cls, lse_cls)``).

>>> import numpy as np, refattn as ra
>>> from refattn.vision import neighborhood_attention, neighborhood_mask
>>> rng = np.random.default_rng(0)
>>> q, k, v = rng.standard_normal((3, 2, 12, 10, 8))       # 2 heads, a 12 x 10 image
>>> out = neighborhood_attention(q, k, v, (5, 5))
>>> flat = lambda x: x.reshape(2, 120, 8)
>>> ref = ra.attention(flat(q), flat(k), flat(v), mask=neighborhood_mask((12, 10), (5, 5)))
>>> bool(np.allclose(out.reshape(2, 120, 8), ref, rtol=1e-12, atol=0))
True
"""
from .neighborhood import neighborhood_attention, neighborhood_mask
from .windows import (shifted_window_attention, shifted_window_mask, window_attention,
                      window_mask)
from .spatial_reduction import spatial_reduction_attention
from .patch_merging import patch_merging
from ._common import with_global
from .drawing import draw_query_pixel

__all__ = ["draw_query_pixel", "neighborhood_attention", "neighborhood_mask",
           "patch_merging", "shifted_window_attention", "shifted_window_mask",
           "spatial_reduction_attention", "window_attention", "window_mask", "with_global"]

# gradients (refattn.vjp finds them through the registry)
from .neighborhood import neighborhood_attention_vjp
from .windows import shifted_window_attention_vjp, window_attention_vjp
from .spatial_reduction import spatial_reduction_attention_vjp
__all__ += ["neighborhood_attention_vjp", "shifted_window_attention_vjp",
            "window_attention_vjp", "spatial_reduction_attention_vjp"]
