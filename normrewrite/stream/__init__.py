"""Converting checkpoints larger than memory: decide on ``meta``, apply tensor by tensor.

A model is built and traced on the ``meta`` device (shapes and dtypes only, no data), the passes
run on that graph and decide every rewrite there, logging each weight edit as a recipe. The log
is replayed on real data read from the ``safetensors`` checkpoint, one recipe at a time, and the
rewritten tensors are written as sharded ``safetensors``, one shard at a time. The modules:

* :mod:`~normrewrite.stream.meta` — the model on ``meta`` with the checkpoint's dtypes (Hugging
  Face directories through :mod:`normrewrite.load.hf`, which checks the config against the
  checkpoint first), tracing and the passes;
* :mod:`~normrewrite.stream.plan` — which output tensor comes from which checkpoint tensor or
  recipe output; tied names; tensors changed without a recipe are refused;
* :mod:`~normrewrite.stream.replay` — the recipe log replayed on real data, reference counted;
* :mod:`~normrewrite.stream.shards` — ``huggingface_hub``'s state-dict splitting and
  ``safetensors``' ``save_file``, a shard at a time;
* :mod:`~normrewrite.stream.convert` — the driver (:func:`convert_checkpoint`) and its report;
* :mod:`~normrewrite.stream.progress` — the progress protocol the caller implements.

Reading is :class:`normrewrite.load.checkpoint.Checkpoint` (``safetensors.safe_open``: the
library's own header validation). Passes are :class:`~normrewrite.core.pass_infra.Pass` objects
resolved by the caller.

Names. Checkpoint keys may carry a prefix the graph lacks or lack one it has
(:func:`normrewrite.load.checkpoint.key_mapping`); the output uses the checkpoint's convention.
Tied weights (``lm_head.weight is embed_tokens.weight``) are written once, under the first name;
non-persistent buffers (rotary ``inv_freq``) are not in checkpoints and are not written.

ONNX (:mod:`~normrewrite.stream.onnx`). ``torch.onnx.export`` of the rewritten ``meta`` program
works as long as nothing reads weight data: the exporter's own optimizer constant-folds
``Transpose(W)`` and so fails with "Cannot copy out of meta tensor". The program is therefore
exported unoptimized, each ``meta`` initializer is bound to an ``onnx_ir.ExternalTensor`` at the
rewritten tensor's slot in scratch safetensors (the replay above, written beside the destination),
``Transpose(W)`` becomes a lazily transposed initializer (read in row blocks), the optimizer runs
with folding of weight-reading nodes disabled, and ``onnx_ir.save`` streams the weights into
``OUT.onnx.data`` one tensor at a time (untransposed ones are copied file to file). Cost: the
scratch copy needs disk space equal to the output.
"""

from normrewrite.stream.convert import StreamResult, convert_checkpoint
from normrewrite.stream.onnx import StreamOnnxResult, convert_checkpoint_onnx
from normrewrite.stream.progress import NoProgress, Progress

__all__ = ["NoProgress", "Progress", "StreamOnnxResult", "StreamResult", "convert_checkpoint",
           "convert_checkpoint_onnx"]
