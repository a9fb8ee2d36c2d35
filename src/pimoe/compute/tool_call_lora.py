"""The LoRA-tuned tool call: baseline (c) with its LM tuned, not few-shot prompted.

A copy of the frozen LM gets LoRA adapters (:mod:`pimoe.moe.lora`, rank ``r`` on every linear
layer of the decoder blocks by default, :data:`ALL_LINEAR`; the base weights stay frozen) trained on the chain's own
training questions (:func:`training_problems`: the train split of
:class:`~pimoe.compute.word_problems.WordProblemSet`, problems ``0 .. problems-1``, then
``composed`` questions of the phrasing grammar, :func:`~pimoe.compute.word_compose.composed_problems`)
to answer in the tool-call format, with no few-shot prefix::

    Question: {question}\\nAnswer: {answer up to the result}<<{expression}>>{result}{rest}\\n

Each example is tokenized in the pieces the tool-call pipeline
(:func:`~pimoe.compute.llm_baselines.tool_call`) sees at inference: the question block (prompt),
the text through ``>>`` (written by the LM), the result (inserted by Python, so never a
target) and the rest of the answer through the newline (written by the LM). The loss is the
cross-entropy on the LM-written pieces only.

After training the adapters are merged (:func:`~pimoe.moe.lora.merge_lora`), so the tuned model
decodes at the base model's cost. :func:`cached_tool_lora` saves the adapters
(``adapter_model.safetensors`` + ``adapter_config.json``) and the training report under
``pimoe.models.cache_root() / "tool_lora"``, keyed by the settings and the base weights, and
loads them on later runs instead of retraining.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pimoe.compute.llm_prompts import question_block
from pimoe.compute.word_compose import composed_problems
from pimoe.compute.word_problems import WordProblem, WordProblemSet
from pimoe.io import atomic_write_text, tensor_digest
from pimoe.moe.lora import LoRAConfig, add_lora, load_lora, merge_lora, save_lora

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100  # label of positions without a loss (transformers' convention)
REPORT_FILE = "training.json"


@dataclass(frozen=True)
class ToolLoRASettings:
    """Data, adapters and optimization of :func:`train_tool_lora`.

    ``problems``, ``composed``, ``train_digits``, ``heldout_digits`` and ``seed`` pick the
    training problems as :class:`~pimoe.compute.llm_train.ChainTrainSettings` does (the benchmark
    copies them from the chain's settings). Training runs ``ceil(epochs * examples /
    batch_size)`` optimizer steps over successive shuffled passes; ``epochs`` may be fractional
    (as transformers' ``num_train_epochs``: the last pass stops part way), which is how the
    benchmark matches the adapters' training CPU time to the chain's modules'.
    """

    problems: int = 400
    composed: int = 0
    train_digits: int = 5
    heldout_digits: int = 8
    seed: int = 0
    epochs: float = 1.0
    batch_size: int = 4
    lr: float = 2e-3
    r: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ALL_LINEAR

    def __post_init__(self) -> None:
        for name in ("problems", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if (
            isinstance(self.composed, bool)
            or not isinstance(self.composed, int)
            or self.composed < 0
        ):
            raise ValueError(f"composed must be an int >= 0, got {self.composed!r}")
        for name in ("epochs", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        object.__setattr__(self, "epochs", float(self.epochs))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            target_parameters=(),
            target_modules=self.target_modules,
        )


def training_problems(settings: ToolLoRASettings) -> list[WordProblem]:
    """The training problems of ``settings``: ``problems`` of the train split, then ``composed``
    composed-phrasing questions, drawn as :func:`~pimoe.compute.llm_train.train_chain` draws them."""
    problems = WordProblemSet(settings.train_digits, settings.heldout_digits, settings.seed)
    return problems.problems("train", 0, settings.problems) + composed_problems(
        problems, settings.composed
    )


def step_batches(examples: int, settings: ToolLoRASettings) -> list[list[int]]:
    """Example indices of each optimizer step: ``ceil(epochs * examples / batch_size)`` batches
    taken in order from successive passes, each pass a fresh shuffle (seeded by ``settings.seed``)."""
    steps = math.ceil(settings.epochs * examples / settings.batch_size)
    order = random.Random(settings.seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        index = list(range(examples))
        order.shuffle(index)
        batches += [
            index[i : i + settings.batch_size] for i in range(0, examples, settings.batch_size)
        ]
    return batches[:steps]


def tool_example(tokenizer: PreTrainedTokenizerBase, problem: WordProblem) -> tuple[Tensor, Tensor]:
    """``(input_ids [T], labels [T])`` of one problem in the tool-call format; ``labels`` is
    :data:`IGNORE` on the question block and on the result the tool inserts."""
    answer = problem.answer_text
    end = problem.result_start + len(problem.answer)
    pieces = (
        (question_block(problem.question), False),
        (" " + answer[: problem.result_start] + f"<<{problem.expression}>>", True),
        (problem.answer, False),
        (answer[end:] + "\n", True),
    )
    ids: list[int] = []
    labels: list[int] = []
    for text, learned in pieces:
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids += piece
        labels += piece if learned else [IGNORE] * len(piece)
    return torch.tensor(ids), torch.tensor(labels)


def _batch(examples: list[tuple[Tensor, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels``, each ``[B, T_max]``."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = x, y, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tool_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy of ``model`` on the labelled tokens of ``batch`` (see :func:`_batch`)."""
    loss: Tensor = model(**batch).loss
    return loss


def train_tool_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: ToolLoRASettings = ToolLoRASettings(),
    progress: bool = True,
) -> tuple[PreTrainedModel, dict]:
    """A copy of ``model`` with LoRA adapters trained on the tool-call format (``model`` itself
    is left untouched). The adapters are *not* merged: call :func:`~pimoe.moe.lora.merge_lora`
    before decoding. Returns the copy and a report: wall and CPU seconds, optimizer steps,
    trainable parameters, first and final loss."""
    examples = [tool_example(tokenizer, p) for p in training_problems(settings)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(settings.seed)
    tuned = copy.deepcopy(model)
    add_lora(tuned, settings.lora)
    tuned.eval()  # no dropout; gradients still flow into the adapters
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    batches = step_batches(len(examples), settings)
    schedule = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: 1 - step / len(batches))
    losses = []
    start, cpu = time.perf_counter(), time.process_time()
    with torch.enable_grad():
        for chosen in tqdm(batches, desc="tool-call LoRA", disable=not progress):
            loss = tool_loss(tuned, _batch([examples[i] for i in chosen], int(pad)))
            optim.zero_grad()
            loss.backward()
            optim.step()
            schedule.step()
            losses.append(loss.item())
    report = {
        "train_s": round(time.perf_counter() - start, 1),
        "train_cpu_s": round(time.process_time() - cpu, 1),  # this process's CPU time
        "steps": len(batches),
        "examples": len(examples),
        "examples_seen": sum(len(b) for b in batches),
        "params": sum(p.numel() for p in trainable),
        "loss_first": round(losses[0], 4),
        "loss_final": round(sum(losses[-5:]) / len(losses[-5:]), 4),
        "settings": json.loads(json.dumps(asdict(settings))),  # as saved in the cache
    }
    return tuned, report


def weights_fingerprint(model: nn.Module) -> str:
    """Short content hash of ``model``'s first and last parameters (the input embeddings and the
    output layer or final norm of a transformers causal LM)."""
    params = list(model.parameters())
    return tensor_digest({"first": params[0], "last": params[-1]})[:16]


def tool_lora_cache_dir(name: str, settings: ToolLoRASettings, fingerprint: str) -> Path:
    """Cache folder of the adapters trained on ``name`` (weights ``fingerprint``) with ``settings``
    on the current training data: the key holds a digest of every training example's question,
    answer and expression (:func:`training_problems`), so adapters trained on other phrasings,
    templates or composed ones, live under another key and are retrained, never loaded."""
    from pimoe.models import cache_root
    from pimoe.models.cache import keyed_folder

    parts = {
        "model": fingerprint,
        "data": hashlib.sha256(
            json.dumps(
                [[p.question, p.answer_text, p.expression] for p in training_problems(settings)]
            ).encode()
        ).hexdigest(),
        **asdict(settings),
    }
    return keyed_folder(cache_root() / "tool_lora", name, parts)


def cached_tool_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    settings: ToolLoRASettings,
    retrain: bool = False,
    progress: bool = True,
) -> tuple[PreTrainedModel, dict, str]:
    """The tuned copy of ``model`` with its adapters merged: loaded from
    :func:`tool_lora_cache_dir` when an earlier run saved it (and not ``retrain``), else trained
    by :func:`train_tool_lora` and saved there. Returns the copy, its training report (from the
    run that trained it) and ``"cache"`` or ``"trained"``."""
    folder = tool_lora_cache_dir(name, settings, weights_fingerprint(model))
    if (folder / REPORT_FILE).is_file() and not retrain:
        try:
            report = json.loads((folder / REPORT_FILE).read_text())
            tuned = copy.deepcopy(model)
            load_lora(tuned, folder)
            merge_lora(tuned.eval())
            return tuned, report, "cache"
        except (ValueError, OSError, KeyError):
            pass  # an unreadable or stale cache entry is retrained and overwritten
    tuned, report = train_tool_lora(model, tokenizer, settings, progress)
    save_lora(tuned, folder)
    atomic_write_text(folder / REPORT_FILE, json.dumps(report, indent=2))
    merge_lora(tuned)
    return tuned, report, "trained"
