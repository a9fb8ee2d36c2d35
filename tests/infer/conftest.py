"""Tiny generation models shared by the generation tests: a random Hugging Face Llama with a real
byte-level BPE tokenizer, and a byte-level PiMoELM."""

from __future__ import annotations

import pytest
import torch
from tiny_lm import save_tiny_llama

from pimoe.infer.lm_models import HFGenerationModel, PiMoEGenerationModel, open_generation_model
from pimoe.moe.config import MoEConfig
from pimoe.moe.model import LMConfig, PiMoELM


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> HFGenerationModel:
    model = open_generation_model(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama"))
    assert isinstance(model, HFGenerationModel)
    return model


@pytest.fixture(scope="module")
def tiny_pimoe() -> PiMoEGenerationModel:
    torch.manual_seed(0)
    cfg = LMConfig(
        block_size=64,
        n_layer=2,
        n_head=2,
        d_model=32,
        moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=32),
    )
    return PiMoEGenerationModel(PiMoELM(cfg))
