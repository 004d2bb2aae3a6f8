"""Stage 2: the LLaVA-1.5 recipe (conversation templates, data, model assembly, training) on transformers' Llava.

Public entry points: `stage2_llava.stage` (pretrain, finetune, write_lm_corpus, build_demo_lm)."""
