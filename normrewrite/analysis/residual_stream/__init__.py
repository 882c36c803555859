"""The residual stream as seen by its LayerNorms: which values carry it, who writes it, who reads it.

Starting from the input of every LayerNorm over the last dim, the analysis walks the data-flow
graph backwards through ops that act on each feature vector linearly and independently — residual
adds, dropout (eval), no-op casts, reshapes/flattens that keep each feature vector whole (a conv
layout's ``(N, C, H, W) → (N, C, H·W)``), transposes/permutes, ``cat``/``expand``/``slice``/``select``
along other axes, interpolation over spatial axes (:mod:`.layout` tracks the feature axis), a mean or sum over other axes (BEiT's mean over tokens, ConvNeXt's over H, W), scaling by a
number — and stops at the **writers**: the ops whose output enters the stream and whose
stored tensors can be edited:

* a linear layer (``Linear``, GPT-2's Conv1D ``addmm``, Falcon's ``x @ W.T``) — its output
  features; or one head part of a fused projection split by a view (Persimmon's per-head
  QK-LayerNorm) — that part's rows, per head,
* a (non-grouped) convolution with the features as channels (ViT's patch embedding),
* an embedding table (token, position, token-type embeddings),
* a stored tensor added in directly or picked/tiled first (``cls_token``, position tables through
  ``unsqueeze``/``index_select``/``getitem``/``expand``/``repeat``, a ``gather`` of whole
  feature vectors),
* a value the same for every feature added in (``x + 0``, the start of MusicGen's ``sum()``
  over codebook embeddings; any ``x ± c`` with ``c`` a number or of size 1 along the features)
  — a ``"shift"`` writer: centred it is zero, so the rewrite drops it,
* anything else — a norm's output (BLOOM's embedding LayerNorm), a GELU (wav2vec2's positional
  conv), a model input — is a ``"centre"`` writer: an explicit ``x − mean(x)`` is inserted after
  it for the stream's users only. A stream value also read by a non-norm op is retried once as
  such a cut (its sources left alone).

A stream that only such mean subtractions could centre (as many as its norms: ConvNeXt's norms
read depthwise convs, wav2vec2's feature projection norm reads the conv features) is marked
``explicit``: its writers become one subtraction at each norm's input — exact, but saving
nothing. Not where the first walk found Post-LN blocks: cutting before each of their norms would
convert a Post-LN model norm by norm.

The values visited form the stream; the walks that share values are merged into one stream with
networkx (connected components), so an encoder and a decoder, or two towers, are separate
streams. Then every live user of a stream value (or of a writer's output; a value nothing
depends on is not read) must be inside the stream or a LayerNorm reading it over the feature axis; anything else — a model output, a post-norm branch
reading the un-normalized sum, an RMSNorm, a pooling — is recorded as a problem of that stream.

This is what ``ln-to-rmsnorm`` needs: subtracting the feature mean from every writer makes every
stream value zero-mean (each op above commutes with centring ``C = I − 11ᵀ/D``), which is harmless
exactly when nothing but LayerNorms reads the stream. It only reads the graph.
"""

from .ops import ResidualStream, StreamWriter, shifted_by
from .streams import layernorm_readers, residual_streams

__all__ = [
    "ResidualStream",
    "StreamWriter",
    "layernorm_readers",
    "residual_streams",
    "shifted_by",
]
