"""The roof: the `ito-mllm` CLI, the run config, run directories, the chain and A/B runs, the cost plan; the only
package that imports the stages (ARCHITECTURE.md)."""
