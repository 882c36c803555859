"""The residual stream as seen by its LayerNorms: which values carry it, who writes it, who reads it.

Starting from the input of every LayerNorm over the last dim, the analysis walks the data-flow
graph backwards through ops that act on each feature vector linearly and independently — residual
adds, dropout (eval), no-op casts, reshapes that keep the feature dim, transposes/permutes/flatten
(the feature axis is tracked through them), ``cat``/``expand``/``slice`` along other axes, scaling
by a number — and stops at the **writers**: the ops whose output enters the stream and whose
stored tensors can be edited:

* a linear layer (``Linear`` or GPT-2's Conv1D ``addmm``) — its output features,
* a (non-grouped) convolution with the features as channels (ViT's patch embedding),
* an embedding table (token, position, token-type embeddings),
* a stored tensor added in directly (ViT's ``cls_token`` and position embeddings).

The values visited form the stream; the walks that share values are merged into one stream with
networkx (connected components), so an encoder and a decoder, or two towers, are separate
streams. Then every user of a stream value (or of a writer's output) must be inside the stream or
a LayerNorm reading it over the feature axis; anything else — a model output, a post-norm branch
reading the un-normalized sum, an RMSNorm, a pooling — is recorded as a problem of that stream.

This is what ``ln-to-rmsnorm`` needs: subtracting the feature mean from every writer makes every
stream value zero-mean (each op above commutes with centring ``C = I − 11ᵀ/D``), which is harmless
exactly when nothing but LayerNorms reads the stream. It only reads the graph.
"""

from .ops import ResidualStream, StreamWriter
from .streams import layernorm_readers, residual_streams

__all__ = ["ResidualStream", "StreamWriter", "layernorm_readers", "residual_streams"]
