r"""Memory-augmented attention: keys and values beyond the current sequence.

Four mechanisms, each a float64 reference with the layout of :func:`refattn.attention`
(``q (..., Hq, N, D)``, ``k (..., Hkv, M, D)``, ``v (..., Hkv, M, Dv)``, GQA: query head
``h`` uses KV head ``h // (Hq // Hkv)``):

* :func:`transformer_xl_attention` — segment-level recurrence (Dai et al. 2019,
  "Transformer-XL"): the sequence is processed in segments of ``segment_len``; a query
  attends causally within its segment and to a cache of the ``mem_len`` tokens before
  the segment. Equal to exact attention under :func:`transformer_xl_mask`.
* :func:`compressive_attention` — the Compressive Transformer (Rae et al. 2020): tokens
  that fall out of the memory are compressed at rate ``c`` (mean/max pooling or a 1-D
  convolution) into a second memory of up to ``cmem_len`` compressed slots.
* :func:`persistent_memory_attention` — persistent memory vectors (Sukhbaatar et al.
  2019, "Augmenting Self-attention with Persistent Memory"): ``P`` fixed key/value
  slots concatenated to every query's keys, visible under any mask.
* :func:`knn_memory_attention` — kNN-retrieval memory (Wu et al. 2022, "Memorizing
  Transformers"): each query retrieves its ``topk`` best keys from an external store,
  attends to them and, separately, to its causal local context; a per-head gate mixes
  the two.

**Keys and values as the cache.** In Transformer-XL and the Compressive Transformer the
memory holds the previous layer's *hidden states*, from which each layer computes keys
and values. Here the cache holds the *keys and values* themselves: for linear key/value
projections this is the same computation (mean pooling, or any linear compression,
commutes with an affine projection); max pooling and a channel-mixing convolution then
act on keys and values instead of hidden states. The stop-gradient of the memory is
irrelevant to a forward reference.

**Positions.** Segments are cut by *absolute key position*: segment ``s`` holds positions
``[s·S, (s+1)·S)``. When ``N != M`` the queries are the last ``N`` positions (bottom-right
alignment, query ``i`` at position ``i' = i + M - N``, as in decoding with a KV cache);
query rows at negative positions see nothing and give 0 (lse ``-inf``).

**Relative positions** belong to the layer, not to this recurrence. The Transformer-XL
and persistent-memory references take ``bias=`` (an additive ``(..., Hq, N, M)`` array or
a score modifier from :mod:`refattn.scores`, evaluated at the full-sequence indices), so
the position terms of Transformer-XL's relative attention can be passed in precomputed.
Memory slots that are not sequence positions (persistent slots, compressed slots,
retrieved keys) get no bias.

**Implied matrices.** Transformer-XL and the Compressive Transformer with mean pooling
(or a 1-D convolution) are linear in ``v`` with an ``(N, M)`` matrix over the sequence;
they register it. Persistent and retrieved slots are not columns of ``v``, so their
mechanisms register no implied matrix; :func:`persistent_memory_attention_matrix` and
:func:`knn_memory_attention_matrix` return the matrix over ``[memory slots; sequence]``
instead.

>>> import numpy as np, refattn as ra
>>> from refattn.memory import transformer_xl_attention, transformer_xl_mask
>>> q, k, v = np.random.default_rng(0).standard_normal((3, 2, 10, 8))
>>> out = transformer_xl_attention(q, k, v, segment_len=4, mem_len=2)
>>> mask = transformer_xl_mask(segment_len=4, mem_len=2)
>>> bool(np.allclose(out, ra.attention(q, k, v, mask=mask), rtol=1e-12))
True
>>> mask.materialize(10, 10)[9].astype(int)    # segment [8, 10) plus 2 memory tokens
array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
"""
from .transformer_xl import (transformer_xl_attention, transformer_xl_attention_matrix,
                             transformer_xl_init_state, transformer_xl_mask,
                             transformer_xl_step)
from .compressive import (compress_memory, compressive_attention,
                          compressive_attention_matrix, compressive_init_state,
                          compressive_step)
from ._common import SegmentMemoryState, random_memory
from .persistent import persistent_memory_attention, persistent_memory_attention_matrix
from .knn import knn_memory_attention, knn_memory_attention_matrix

__all__ = ["SegmentMemoryState", "compress_memory", "compressive_attention",
           "compressive_attention_matrix", "compressive_init_state", "compressive_step",
           "knn_memory_attention", "knn_memory_attention_matrix",
           "persistent_memory_attention", "persistent_memory_attention_matrix",
           "random_memory", "transformer_xl_attention", "transformer_xl_attention_matrix",
           "transformer_xl_init_state", "transformer_xl_mask", "transformer_xl_step"]

# gradients (refattn.vjp finds them through the registry)
from .transformer_xl import transformer_xl_attention_vjp
from .compressive import compressive_attention_vjp
from .persistent import persistent_memory_attention_vjp
from .knn import knn_memory_attention_vjp
__all__ += ["transformer_xl_attention_vjp", "compressive_attention_vjp",
            "persistent_memory_attention_vjp", "knn_memory_attention_vjp"]
