"""Rule-scored variants of lmms-eval tasks whose default scoring needs an LLM judge."""
