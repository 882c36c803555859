"""ONNX emission: :mod:`.options` (what to emit), :mod:`.export` (torch program → ONNX),
:mod:`.cleanup` (exact graph cleanup and runtime forms), :mod:`.write` (atomic write and
validation), and :mod:`.pipeline`, the one pipeline all ONNX outputs come from."""
