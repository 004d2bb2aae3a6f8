"""`ito-mllm` command line: `ito-mllm COMMAND [SUBCOMMAND] [--config PRESET_OR_YAML] [--run-dir DIR] [KEY=VALUE ...]`.

Every command resolves one RunConfig (preset or YAML, then dotted overrides), saves it
into the run directory, and records its outputs in the run directory's manifest.json.
Config and input errors print one line and exit 2 (config) or 1 (input), no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from common.io import InputError, RunStopped
from common.schema import ConfigError

EXIT_CONFIG = 2
EXIT_INPUT = 1

CONTRACT = """\
Every command accepts --config PRESET_OR_YAML (presets: {presets}), --run-dir DIR and
dotted KEY=VALUE overrides such as stage1.batch_size=64 or eval.tasks=pope,gqa.
Without --config, a run directory's saved config.yaml is reused, else the `demo` preset.
"""


def _add_common(p: argparse.ArgumentParser, run_dir_help: str = "run directory (default: runs/<config name>)") -> None:
    p.add_argument("--config", help="preset name or YAML file (default: the run dir's config.yaml, else 'demo')")
    p.add_argument("--run-dir", type=Path, help=run_dir_help)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. stage1.epochs=2")


def _add_nodes(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("several nodes (torchrun's static rendezvous; run the same command on every node)")
    g.add_argument("--nnodes", type=int, help="nodes in the job (shorthand for stage1.nnodes / stage2.nnodes)")
    g.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1 (default 0)")
    g.add_argument("--master-addr", default="127.0.0.1", help="node 0's address, reachable from every node")
    g.add_argument("--master-port", type=int, default=29500, help="a free port on node 0 (default 29500)")


def _command(sub, name: str, help: str, handler: Callable, **kw) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    from pipeline import commands as c
    from pipeline.config import preset_names

    parser = argparse.ArgumentParser(
        prog="ito-mllm",
        description="CLIP vs ITO vision towers -> LLaVA-1.5 -> lmms-eval, chained through run directories.",
        epilog=CONTRACT.format(presets=", ".join(preset_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="generate datasets").add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    p = _command(data, "demo", "generate the embedded demo world (shards, LLaVA JSON, eval sets)", c.data_demo)
    p.add_argument("--out", type=Path, help="output directory (default: RUN_DIR/data)")
    p.add_argument("--size", choices=("tiny", "demo"), help="shorthand for data.size")
    p.add_argument("--seed", type=int, help="shorthand for data.seed")
    _add_common(p, "record the data in this run directory's manifest")
    p = _command(data, "paper13-fixtures", "write small offline HF-cache fixtures of the 13 paper benchmarks "
                 "(use with HF_HOME=OUT)", c.data_paper13_fixtures)
    p.add_argument("--out", type=Path, required=True, help="directory to use as HF_HOME (datasets go to OUT/datasets)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default 0)")

    s1 = sub.add_parser("stage1", help="dual-encoder pretraining (CLIP / ITO)").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True
    )
    p = _command(s1, "train", "pretrain the dual encoder; resumes from the run dir's checkpoints", c.stage1_train)
    p.add_argument("--nproc", type=int, help="processes to launch per node (shorthand for stage1.nproc)")
    _add_nodes(p)
    _add_common(p)
    _add_common(_command(s1, "export", "drop the fusion head; write open_clip and Hugging Face CLIP directories", c.stage1_export))
    _add_common(_command(s1, "eval", "zero-shot, retrieval, linear probe, modality gap, UMAP", c.stage1_eval))

    s2 = sub.add_parser("stage2", help="LLaVA-1.5 recipe on the frozen tower").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True
    )
    for name, help_, handler in (("pretrain", "phase 1: train the projector (template plain)", c.stage2_pretrain),
                                 ("finetune", "phase 2: visual instruction tuning (template vicuna_v1)", c.stage2_finetune)):
        p = _command(s2, name, help_, handler)
        _add_nodes(p)
        _add_common(p)

    p = _command(sub, "eval", "run lmms-eval tasks on a LLaVA directory", c.evaluate)
    p.add_argument("--model", type=Path, help="LLaVA HF directory (default: the run's stage2_finetune output)")
    p.add_argument("--tasks", help="shorthand for eval.tasks (comma-separated names or task sets)")
    _add_common(p)
    _add_common(_command(sub, "run", "data -> stage 1 -> export -> stage 2 -> eval for one arm, resumable", c.run))
    _add_common(_command(sub, "ab", "run every arm of ab.arms and write the A/B report", c.ab))
    _add_common(_command(sub, "demo", "the first-time user's command: the full CLIP-vs-ITO A/B on the demo world", c.demo))

    p = _command(sub, "chat", "talk to a trained LLaVA: one-shot (--prompt) or interactive turns, tokens streamed, "
                 "the vicuna_v1 prompt of training and eval", c.chat)
    p.add_argument("--model", type=Path, help="LLaVA HF directory (default: the run's stage2_finetune output)")
    p.add_argument("--image", help="image the conversation is about (interactive: /image PATH switches)")
    p.add_argument("--prompt", help="ask this once, print the answer and exit (default: interactive turns)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampled")
    p.add_argument("--top-p", type=float, help="nucleus sampling with --temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    _add_common(p, "run directory whose finetuned model is the default --model (default: runs/<config name>)")

    p = _command(sub, "plan", "cost before running: parameters, memory per GPU, FLOPs, GPU-hours, disk per stage "
                 "(models on the meta device; writes RUN_DIR/plan.json)", c.plan)
    _add_common(p, "write plan.json here (default: runs/<config name>)")
    cfg = sub.add_parser("config", help="inspect configs").add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
    _add_common(_command(cfg, "show", "print the resolved config as YAML", c.config_show))
    _command(cfg, "keys", "list every config key with its type, default and help", c.config_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as e:
        print(f"ito-mllm: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except InputError as e:
        print(f"ito-mllm: input error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except RunStopped as e:
        print(f"ito-mllm: stopped: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("ito-mllm: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
