"""Stage 2: the LLaVA-1.5 recipe (conversation templates, data, model assembly, training) on transformers' Llava."""
