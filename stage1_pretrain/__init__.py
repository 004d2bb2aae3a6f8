"""Stage 1: CLIP / ITO dual-encoder pretraining on open_clip (models, methods, losses, task, export).

Kept import-light on purpose: submodules pull in torch/open_clip only when imported.
"""
