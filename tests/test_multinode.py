"""Several nodes through torchrun's static rendezvous: two "nodes" on this machine (one process each) train stage 1
as one 2-process job, through the CLI (`--nnodes 2 --node-rank R --master-addr --master-port`), equal to one node
with 2 processes; the launch config is torchrun's; the sbatch generator writes the same commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.io import load_safetensors
from common.launch import Nodes, free_port, launch_config
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_launch_config_is_torchruns_static_rendezvous():
    cfg = launch_config(8, Nodes(4, 2, "node-0.cluster", 29555))
    assert (cfg.min_nodes, cfg.max_nodes, cfg.nproc_per_node) == (4, 4, 8)
    assert (cfg.rdzv_backend, cfg.rdzv_endpoint, cfg.rdzv_configs["rank"]) == ("static", "node-0.cluster:29555", 2)
    local = launch_config(2, Nodes())
    assert (local.min_nodes, local.max_nodes, local.rdzv_backend) == (1, 1, "c10d")
    with pytest.raises(ValueError, match="--node-rank 4 is outside 0..3"):
        launch_config(8, Nodes(4, 4))


def test_node_options_are_checked_in_one_line(tmp_path, capsys):
    assert main(["stage1", "train", "--config", "tiny", "--nnodes", "2"]) == 2
    assert "--run-dir: several nodes write one run directory" in capsys.readouterr().err
    assert main(["stage2", "pretrain", "--config", "tiny", "--run-dir", str(tmp_path), "--nnodes", "2",
                 "--node-rank", "2"]) == 2
    assert "--node-rank: 2 is outside 0..1" in capsys.readouterr().err
    assert main(["stage1", "train", "--config", "tiny", "--run-dir", str(tmp_path), "--nnodes", "3"]) == 2
    assert "stage1.batch_size: 16 is not divisible by accum_steps*nproc*nnodes=3" in capsys.readouterr().err


def _train(rd: Path, data: Path, *extra: str) -> subprocess.Popen:
    args = ["stage1", "train", "--config", "tiny", "--run-dir", str(rd), f"data.root={data}",
            "stage1.zero_shot_every_epoch=false", *extra]
    code = "import sys, torch; torch.set_num_threads(1); from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    # one thread everywhere: both jobs then sum in the same order and agree to the bit
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_nodes_train_as_one_two_process_job(tmp_path):
    data = tmp_path / "data"
    assert main(["data", "demo", "--config", "tiny", "--out", str(data)]) == 0
    port = free_port()
    jobs = [_train(tmp_path / "two_nodes", data, "--nnodes", "2", "--node-rank", str(r), "--master-addr", "127.0.0.1",
                   "--master-port", str(port)) for r in (0, 1)]
    jobs.append(_train(tmp_path / "one_node", data, "--nproc", "2"))
    outs = [p.communicate(timeout=900)[0] for p in jobs]
    assert [p.returncode for p in jobs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    summary = json.loads((tmp_path / "two_nodes" / "stage1/train/train_summary.json").read_text())
    assert summary["world_size"] == 2
    logs = [[json.loads(x)["loss"] for x in (tmp_path / d / "stage1/train/logs/metrics.jsonl").read_text().splitlines()]
            for d in ("two_nodes", "one_node")]
    assert len(logs[0]) == len(logs[1]) > 2 and logs[0] == logs[1]
    a, b = (load_safetensors(tmp_path / d / "stage1/train/final/model.safetensors") for d in ("two_nodes", "one_node"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    manifest = json.loads((tmp_path / "two_nodes" / "manifest.json").read_text())  # written by node 0 only
    assert "checkpoint_dir" in manifest["stages"]["stage1"]["outputs"]


def test_sbatch_generator_runs_the_same_commands_on_every_node(tmp_path):
    import shlex

    from pipeline.cli import build_parser

    sys.path.insert(0, str(ROOT / "scripts"))
    import slurm

    out = tmp_path / "job.sbatch"
    assert slurm.main(["--config", "paper", "--run-dir", "/shared/run", "--nodes", "4", "--gpus-per-node", "8",
                       "--out", str(out), "stage1.method=ito", "stage1.train_data=/data/{00000000..00139999}.tar"]) == 0
    text = out.read_text()
    assert "#SBATCH --nodes=4" in text and "#SBATCH --gpus-per-node=8" in text
    runs = [line for line in text.splitlines() if line.startswith("srun ")]
    assert [r.split(" _ ")[1].split()[:2] if " _ " in r else r.split()[4:6] for r in runs] == [
        ["stage1", "train"], ["stage1", "export"], ["stage1", "eval"], ["stage2", "pretrain"], ["stage2", "finetune"],
        ["eval", "--config"]]
    configs = set()
    for r in runs:
        argv = shlex.split(r.split(" _ ", 1)[1] if " _ " in r else r.split("ito-mllm ", 1)[1])
        argv = [x.replace("$MASTER_ADDR", "node0").replace("$MASTER_PORT", "29500") for x in argv]
        if " _ " in r:  # on every node: --nnodes/--master-*, the node rank from $SLURM_NODEID
            assert '--node-rank "$SLURM_NODEID"' in r and argv[-6:-4] == ["--nnodes", "4"]
        args = build_parser().parse_args(argv)
        configs.add(tuple(args.overrides))
        assert "stage1.train_data=/data/{00000000..00139999}.tar" in args.overrides  # braces survive the shell
    assert len(configs) == 1  # the same resolved config everywhere: the chain's step keys agree
    assert "stage2.pretrain.per_device_batch_size=8" in next(iter(configs))  # 256 over 32 GPUs
    assert slurm.main(["--config", "paper", "--run-dir", "/x", "stage1.nonsense=1"]) == 2
