"""The embedded demo world: procedurally rendered shape scenes with captions and questions.

`generate(out_dir, size, seed, image_size)` writes stage-1 webdataset shards and a
zero-shot/retrieval split, stage-2 LLaVA JSON with an image folder, stage-3 benchmark
sets in the lmms-lab parquet layouts (POPE, VQAv2, GQA, MMStar, MMBench) and a
`manifest.json`. The output is byte-identical for the same (size, seed, image_size).
`demo_world.paper13` writes offline fixtures of the paper's 13 lmms-eval benchmarks from the
same scenes, as the Hugging Face cache those tasks load from.
"""

from demo_world.build import GENERATOR_VERSION, SIZES, generate

__all__ = ["GENERATOR_VERSION", "SIZES", "generate"]
