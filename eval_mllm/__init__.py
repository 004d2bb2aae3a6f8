"""Stage 3: the benchmarks through lmms-eval and the A/B report. Public entry points: `eval_mllm.stage`."""
