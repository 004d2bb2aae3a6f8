"""Local lmms-eval tasks: YAML templates (materialised per data root by `eval_mllm.runner`) and their utils."""
