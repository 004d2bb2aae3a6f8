"""The real-LM path: both stage-2 phases on SmolLM2-135M-Instruct (GGUF, Llama architecture) for a few steps."""

from __future__ import annotations

import pytest
import torch
from conftest import smollm2_gguf as _gguf
from test_stage2_data import write_llava_data
from test_stage2_train import write_tower

from pipeline.config import load_config
from stage2_llava.train import run_phase


@pytest.mark.slow
@pytest.mark.skipif(_gguf() is None, reason="SmolLM2 GGUF not fetched (python scripts/fetch_test_models.py)")
def test_smollm2_pretrain_then_finetune(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(2)
    pre, fin, folder = write_llava_data(tmp_path, n_images=8)
    tower = write_tower(tmp_path / "tower")
    cfg = load_config("tiny", [
        f"stage2.language_model={_gguf()}", f"stage2.vision_tower={tower}", "stage2.model_max_length=128",
        "stage2.pretrain.global_batch_size=2", "stage2.pretrain.per_device_batch_size=2", "stage2.pretrain.max_steps=2",
        "stage2.finetune.global_batch_size=2", "stage2.finetune.per_device_batch_size=2", "stage2.finetune.max_steps=2",
    ]).stage2
    s1 = run_phase("pretrain", cfg, data_json=str(pre), image_folder=str(folder), out_dir=tmp_path / "p", num_workers=0)
    s2 = run_phase("finetune", cfg, init_dir_or_sources=str(tmp_path / "p"), data_json=str(fin),
                   image_folder=str(folder), out_dir=tmp_path / "f", num_workers=0)
    assert s1["steps"] == 2 and s2["steps"] == 2
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "f" / "hf")
    processor = AutoProcessor.from_pretrained(tmp_path / "f" / "hf")
    assert model.config.text_config.model_type == "llama" and model.config.text_config.num_hidden_layers == 30
    assert "<image>" in processor.tokenizer.get_vocab()
