"""Demo-world tasks that mimic POPE, VQAv2, GQA, MMStar and MMBench on small local parquet files."""
