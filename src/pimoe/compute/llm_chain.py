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

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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
        from the name in ``chain.json`` unless ``model`` and ``tokenizer`` are given."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(
                f"{folder} is not a saved computation chain: it needs {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
        raw = json.loads((folder / CONFIG_FILE).read_text())
        if raw.get("format", 1) != CHAIN_FORMAT:
            raise ValueError(
                f"{folder} holds a chain of format {raw.get('format', 1)}, this pimoe reads format "
                f"{CHAIN_FORMAT}: train it again (pimoe chain train)"
            )
        config = ChainConfig(**{**raw, "layers": tuple(raw["layers"])})
        if model is None or tokenizer is None:
            from pimoe.models import load_pretrained

            model, tokenizer = load_pretrained(config.base_model, progress=progress)
        tensors = load_file(str(folder / WEIGHTS_FILE))
        router = TokenRouter(config.feature_dim, config.router_hidden)
        head = OperandHead(config.feature_dim, config.head_hidden)
        router.load_state_dict(
            {k[len("router.") :]: v for k, v in tensors.items() if k.startswith("router.")}
        )
        head.load_state_dict(
            {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}
        )
        return cls(model, tokenizer, router, head, config)
