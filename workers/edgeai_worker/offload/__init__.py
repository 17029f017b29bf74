"""Per-input offloading: early exits, cascades and result reuse (see docs/offload.md).

`gate` (confidence rules, threshold calibration), `reuse` (the bounded approximate
cache), `settings` (what a stage is told), `stage` (what a serving stage does per
request) need numpy and onnxruntime only; `build` trains and exports the digits exits
and cascade with torch.
"""
