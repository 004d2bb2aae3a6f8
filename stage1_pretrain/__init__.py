"""Stage 1: CLIP / ITO dual-encoder pretraining on open_clip (models, methods, losses, task, export).

Public entry points: `stage1_pretrain.stage` (train, export, evaluate). Kept import-light on purpose:
submodules pull in torch/open_clip only when imported.
"""
