"""Engines shared across families, private to refattn: parameter checks (``checks``),
the shape of a call (``problem``), the logit pipeline (``logits``), the row softmax
(``softmax``), the tiled online softmax (``online``), top-k selection (``select``),
k-means (``kmeans``) and threads (``threads``). Mechanisms import from the module that
holds a name; nothing here imports a mechanism.
"""
