"""PiMoE on a frozen pretrained LM: the computation chain.

Three parts, trained separately (:mod:`pimoe.compute.llm_train`) and joined only here:

1. the frozen LM (a Hugging Face causal LM, e.g. SmolLM2-135M-Instruct) behind a cached few-shot
   prefix (:class:`~pimoe.compute.llm_runner.LMRunner`);
2. the text-to-computation module :class:`~pimoe.compute.operand_head.OperandHead`, which reads
   the question's hidden states (from the prompt's prefill: no extra forward pass) and gives the
   engine expression;
3. the router :class:`~pimoe.compute.llm_router.TokenRouter`, consulted at every generated
   token on the last position's hidden states.

Decoding (greedy, KV cache): the LM writes its answer, and may not end it before writing anything
(its first token is never a stop token, as ``min_new_tokens=1`` in transformers); when the router
fires, the exact :class:`~pimoe.compute.engine.ArithmeticEngine` result (or its error token, e.g.
``<err:div0>``) is appended in one forward pass (one prefill of its tokens) and the LM continues
until a newline or ``max_new_tokens``. Right after an inserted result the LM may not write a
digit (the computed number is complete; without this it tended to extend a long inserted
number), and once the ``max_handoffs`` hand-offs are spent it writes no digits at all: every
number after that would be the LM's own arithmetic, which is what the engine is there to replace.

Saved as a folder: ``chain.safetensors`` (router and head weights) and ``chain.json`` (the format
version :data:`CHAIN_FORMAT`, the base model's name, layers, prefix, threshold, sizes); a folder
of another format is refused with a ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pimoe.compute.engine import ArithmeticEngine
from pimoe.compute.llm_prompts import question_block
from pimoe.compute.llm_router import TokenRouter, router_input
from pimoe.compute.llm_runner import LMRunner
from pimoe.compute.operand_head import OperandHead, locate_numbers
from pimoe.io import atomic_write_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CONFIG_FILE, WEIGHTS_FILE = "chain.json", "chain.safetensors"
CHAIN_FORMAT = 2  # 2: the router also reads the LM's digit log-probability


@dataclass
class ChainConfig:
    """What a saved chain needs besides its weights."""

    base_model: str
    prefix: str
    layers: tuple[int, ...]
    feature_dim: int
    router_hidden: int = 64
    head_hidden: int = 128
    threshold: float = 0.5
    max_handoffs: int = 1
    engine_max_digits: int = 40
    training: dict = field(default_factory=dict)
    format: int = CHAIN_FORMAT


@dataclass(frozen=True)
class ChainRun:
    """One answer: ``text`` (inserted results included), LM-generated tokens, forward passes
    (prefill and insertions included), tokens inserted by the engine, the expression used (or
    ``None`` when the router never fired) and the wall time."""

    text: str
    generated_tokens: int
    forward_passes: int
    inserted_tokens: int
    expression: str | None
    seconds: float


def insertion_text(so_far: str, result: str) -> str:
    """``result`` as appended after ``so_far``: with a space unless ``so_far`` ends in one (or is empty)."""
    return result if not so_far or so_far[-1].isspace() or so_far[-1] in "($" else " " + result


#: Largest ``engine_max_digits`` a saved chain may ask for (the engine computes ``10**max_digits``).
MAX_ENGINE_DIGITS = 10_000


def _read_config(path: Path) -> ChainConfig:
    """The :class:`ChainConfig` in ``path`` (a ``chain.json``), every field checked; ``ValueError``
    naming the file and the field."""
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a UTF-8 JSON file: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    found = raw.get("format", 1)
    if type(found) is not int or found != CHAIN_FORMAT:
        raise ValueError(
            f"{path} holds a chain of format {found!r}, this pimoe reads format "
            f"{CHAIN_FORMAT}: train it again (pimoe chain train)"
        )
    fields = {f.name: f for f in dataclasses.fields(ChainConfig)}
    unknown = sorted(set(raw) - set(fields))
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in raw
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if unknown or missing:
        raise ValueError(f"{path}: unknown fields {unknown}, missing fields {missing}")

    def bad(name: str, expected: str) -> ValueError:
        return ValueError(f"{path}: field {name!r} must be {expected}, got {raw[name]!r:.80}")

    def integer(name: str, low: int, high: int | None = None) -> None:
        value = raw.get(name, fields[name].default)
        if type(value) is not int or value < low or (high is not None and value > high):
            raise bad(name, f"an integer in [{low}, {high if high is not None else 'inf'}]")

    for name in ("base_model", "prefix"):
        if name in raw and not isinstance(raw[name], str):
            raise bad(name, "a string")
    if not raw["base_model"] or "\0" in raw["base_model"]:
        raise bad("base_model", "a model name or folder")
    layers = raw["layers"]
    if not isinstance(layers, list) or not layers or any(type(x) is not int for x in layers):
        raise bad("layers", "a non-empty list of integers")
    for name in ("feature_dim", "router_hidden", "head_hidden"):
        integer(name, 1)  # the weights' shapes bound them (_read_weights)
    integer("max_handoffs", 0)
    integer("engine_max_digits", 1, MAX_ENGINE_DIGITS)
    threshold = raw.get("threshold", ChainConfig.threshold)
    if type(threshold) not in (int, float) or not 0.0 <= threshold <= 1.0:  # NaN fails too
        raise bad("threshold", "a number in [0, 1]")
    if not isinstance(raw.get("training", {}), dict):
        raise bad("training", "an object")
    return ChainConfig(**{**raw, "layers": tuple(layers)})


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise json.JSONDecodeError(
            f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}", "", 0
        )
    return dict(pairs)


def _read_weights(path: Path, config: ChainConfig) -> dict[str, Tensor]:
    """The router and head tensors in ``path``, which must be exactly those of ``config``'s
    sizes (compared on the meta device: nothing of ``config``'s sizes is allocated) and finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with torch.device("meta"):
        expected = {
            f"router.{k}": v.shape
            for k, v in TokenRouter(config.feature_dim, config.router_hidden).state_dict().items()
        }
        expected.update(
            {
                f"head.{k}": v.shape
                for k, v in OperandHead(config.feature_dim, config.head_hidden).state_dict().items()
            }
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but "
                f"{CONFIG_FILE}'s sizes (feature_dim, router_hidden, head_hidden = "
                f"{config.feature_dim}, {config.router_hidden}, {config.head_hidden}) give "
                f"{tuple(shape)}"
            )
        if not torch.isfinite(tensors[name]).all():
            raise ValueError(f"{path}: tensor {name!r} holds NaN or infinity")
    return tensors


class ComputationChain:
    """The frozen LM, the router and the text-to-computation head, joined (module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        router: TokenRouter,
        head: OperandHead,
        config: ChainConfig,
    ) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.router, self.head = router.eval(), head.eval()
        self.runner = LMRunner(model, tokenizer, config.prefix, config.layers)
        if self.runner.feature_dim != config.feature_dim:
            raise ValueError(
                f"the model gives {self.runner.feature_dim} features, the modules expect {config.feature_dim}"
            )
        self.engine = ArithmeticEngine(max_digits=config.engine_max_digits)

    def generate(self, question: str, max_new_tokens: int = 48) -> str:
        """The answer text to ``question`` (the engine's result or error token inserted)."""
        return self.run(question, max_new_tokens).text

    def run(self, question: str, max_new_tokens: int = 48) -> ChainRun:
        """Answer ``question`` and count the work (see :class:`ChainRun`)."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        start = time.perf_counter()
        runner = self.runner
        session = runner.start()
        numbers = locate_numbers(self.tokenizer, question_block(question))
        logits, features = runner.feed(session, numbers.ids)
        prompt_len = len(session.tokens)
        question_features, last = features, features[-1]
        expression: str | None = None
        generated = inserted = handoffs = 0
        just_inserted = False
        while generated < max_new_tokens:
            if handoffs < self.config.max_handoffs and self.router.fires(
                router_input(last, runner.digit_logprob(logits)), self.config.threshold
            ):
                if expression is None:
                    expression = self.head.expression(question_features, numbers)
                text = runner.decode(session.tokens[prompt_len:])
                ids = runner.encode(insertion_text(text, self.engine.compute(expression)))
                logits, features = runner.feed(session, ids)
                last, inserted, handoffs = features[-1], inserted + len(ids), handoffs + 1
                just_inserted = True
                continue
            if len(session.tokens) == prompt_len:  # nothing written yet: no empty answer
                logits = logits.masked_fill(runner.stop_tokens, float("-inf"))
            if just_inserted or 0 < self.config.max_handoffs <= handoffs:
                logits = logits.masked_fill(runner.digit_tokens, float("-inf"))
            token = int(logits.argmax())
            generated, just_inserted = generated + 1, False
            if runner.is_stop(token):
                session.tokens.append(token)
                break
            logits, features = runner.feed(session, [token])
            last = features[-1]
        text = runner.decode(session.tokens[prompt_len:]).strip()
        return ChainRun(
            text,
            generated,
            session.forward_passes,
            inserted,
            expression,
            time.perf_counter() - start,
        )

    def save(self, folder: str | Path) -> None:
        """Write ``chain.safetensors`` and ``chain.json`` into ``folder`` (created if needed)."""
        from safetensors.torch import save_file

        from pimoe.io import atomic_output

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"router.{k}": v.contiguous() for k, v in self.router.state_dict().items()}
        tensors.update({f"head.{k}": v.contiguous() for k, v in self.head.state_dict().items()})
        with atomic_output(folder / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        atomic_write_text(folder / CONFIG_FILE, json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(
        cls,
        folder: str | Path,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        progress: bool = False,
    ) -> ComputationChain:
        """Load a saved chain; the base model is loaded with :func:`pimoe.models.load_pretrained`
        from the name in ``chain.json`` unless ``model`` and ``tokenizer`` are given.

        ``ValueError`` naming the file and the field when ``chain.json`` is not the format's JSON
        object (a field missing, unknown, of the wrong type or out of range) or the weights do not
        match its sizes (tensors missing, unexpected, of another shape, or not finite); checked
        before any module is built from the file's values."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(
                f"{folder} is not a saved computation chain: it needs {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
        config = _read_config(folder / CONFIG_FILE)
        tensors = _read_weights(folder / WEIGHTS_FILE, config)
        if model is None or tokenizer is None:
            from pimoe.models import load_pretrained

            model, tokenizer = load_pretrained(config.base_model, progress=progress)
        router = TokenRouter(config.feature_dim, config.router_hidden)
        head = OperandHead(config.feature_dim, config.head_hidden)
        router.load_state_dict(
            {k[len("router.") :]: v for k, v in tensors.items() if k.startswith("router.")}
        )
        head.load_state_dict(
            {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}
        )
        return cls(model, tokenizer, router, head, config)
