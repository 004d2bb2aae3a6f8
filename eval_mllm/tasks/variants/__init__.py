"""Variants of lmms-eval tasks: rule-scored MMBench-CN (lmms-eval's scoring needs an LLM judge) and
TextVQA with LLaVA-1.5's OCR-token prompt (a YAML switch of lmms-eval's own textvqa utils)."""
