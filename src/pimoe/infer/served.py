"""What the server serves (:class:`ServedModel`) and how a request's JSON becomes model input.

Three kinds of model:

- ``"lm"``: a :class:`PiMoELM`; requests send ``token_ids`` or ``text`` (UTF-8 bytes are its
  tokens); the answer holds the logits ``[L, V]`` and the next token id.
- ``"tensor"``: any module taking one float tensor ``[B, *input_shape]``; requests send ``inputs``.
- ``"text"``: a :class:`~pimoe.infer.encoder.ServedEncoder` (a Hugging Face encoder folder such
  as all-MiniLM-L6-v2, or one compressed by ``pimoe compress``); requests send ``text`` (one
  string or a list) and get embeddings ``[D]`` (or ``[N, D]``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict
from torch import Tensor, nn

from pimoe.infer.encoder import ServedEncoder, is_compressed_folder, is_hf_folder
from pimoe.moe.model import PiMoELM

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class ServedModel:
    """A model the server runs.

    Args:
        module: a :class:`PiMoELM` (``kind="lm"``), a :class:`ServedEncoder` (``kind="text"``)
            or any ``nn.Module`` taking one float tensor ``[B, *input_shape]`` and returning a
            tensor with ``B`` rows (``kind="tensor"``).
        kind: "lm" (requests send ``token_ids`` or ``text``), "text" (requests send ``text``: a
            string or a list of strings) or "tensor" (requests send ``inputs``).
        input_shape: for "tensor", the shape of one request's input; ``None`` entries accept any
            size (a leading ``None`` is a variable sequence length: requests of different
            lengths are padded with zeros in a batch, so the model must ignore padding).
        input_dtype: for "tensor", the dtype the JSON numbers are converted to.
        seq_output: for "tensor" with a variable length, whether outputs are per-position
            (``[B, Lmax, ...]``, cut back to each request's length) or pooled (``[B, ...]``).
    """

    module: nn.Module
    kind: Literal["lm", "tensor", "text"]
    input_shape: tuple[int | None, ...] = ()
    input_dtype: str = "float32"
    seq_output: bool = True

    def __post_init__(self) -> None:
        if self.kind == "lm" and not isinstance(self.module, PiMoELM):
            raise TypeError(f"kind='lm' serves a PiMoELM, got {type(self.module).__name__}")
        if self.kind == "text" and not isinstance(self.module, ServedEncoder):
            raise TypeError(f"kind='text' serves a ServedEncoder, got {type(self.module).__name__}")
        if self.kind == "tensor":
            if not self.input_shape:
                raise ValueError(
                    "kind='tensor' needs a non-empty input_shape (one request's shape)"
                )
            if self.input_dtype not in _DTYPES:
                raise ValueError(
                    f"input_dtype must be one of {sorted(_DTYPES)}, got {self.input_dtype!r}"
                )

    @classmethod
    def lm(cls, model: PiMoELM) -> ServedModel:
        """Serve a language model (token ids or UTF-8 text in; logits and next-token id out)."""
        return cls(model, "lm")

    @classmethod
    def encoder(cls, module: ServedEncoder) -> ServedModel:
        """Serve a sentence encoder (texts in; one embedding ``[D]`` per text out)."""
        return cls(module, "text", seq_output=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], map_location: str = "cpu") -> ServedModel:
        """Serve what ``path`` holds: a Hugging Face encoder folder, a ``pimoe compress`` output
        folder (a compressed encoder or PiMoELM), or a :class:`PiMoELM` saved with
        :meth:`PiMoELM.save` (safetensors with config)."""
        if is_hf_folder(path):
            return cls.encoder(ServedEncoder.from_folder(path).to(map_location))
        if is_compressed_folder(path):
            from pimoe.compress.saved import load_compressed, read_recipe

            if read_recipe(Path(path)).get("kind") == "hf":
                return cls.encoder(ServedEncoder.from_compressed(path))
            model = load_compressed(Path(path))
            if not isinstance(model, PiMoELM):
                raise ValueError(
                    f"{path} holds a compressed {type(model).__name__}, which the server cannot serve"
                )
            return cls.lm(model)
        if os.path.isdir(path):
            raise ValueError(
                f"{path} is a folder without config.json or recipe.json: "
                "not a Hugging Face model folder or a pimoe compress output"
            )
        return cls.lm(PiMoELM.load(path, map_location=map_location))

    @classmethod
    def tensor(
        cls,
        module: nn.Module,
        input_shape: tuple[int | None, ...],
        input_dtype: str = "float32",
        seq_output: bool = True,
    ) -> ServedModel:
        """Serve a module taking one float tensor ``[B, *input_shape]``."""
        return cls(module, "tensor", tuple(input_shape), input_dtype, seq_output)

    def check_weights(self, name: str) -> None:
        """:func:`check_finite_weights` of the module."""
        check_finite_weights(self.module, name)

    @property
    def device(self) -> torch.device:
        """The device of the module's first parameter or buffer (CPU for a module without any)."""
        for t in (*self.module.parameters(), *self.module.buffers()):
            return t.device
        return torch.device("cpu")


def check_unicode(text: str) -> str:
    """``text`` if it is valid Unicode; ``ValueError`` naming a lone surrogate (JSON's ``"\\ud800"``
    escapes decode to one, and neither UTF-8 nor a tokenizer can take it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"holds a lone surrogate {text[exc.start]!r} at index {exc.start}, "
            "which is not valid Unicode text"
        ) from None
    return text


#: A request string that must be valid Unicode (a lone surrogate is a 422, not a failure later).
UnicodeStr = Annotated[str, AfterValidator(check_unicode)]


def check_finite_weights(module: nn.Module, name: str) -> None:
    """``ValueError`` naming the tensors if a parameter or buffer of ``module`` (quantized and
    torch.ao packed ones included) holds NaN or infinity: served, such a model would answer every
    request with an error while looking healthy."""
    bad = [key for key, t in _state_tensors(module.state_dict(), "") if not _finite(t)]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(
            f"model {name!r} has NaN or infinite weights in {', '.join(bad[:3])}{more}; "
            "refusing to serve it"
        )


def _state_tensors(value: Any, name: str) -> Iterator[tuple[str, Tensor]]:
    """The tensors of a state dict, tuples and lists (torch.ao packed parameters) included."""
    if isinstance(value, Tensor):
        yield name, value
    elif isinstance(value, dict):
        for key, v in value.items():
            yield from _state_tensors(v, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _state_tensors(v, f"{name}.{i}")


def _finite(t: Tensor) -> bool:
    values = t.dequantize() if t.is_quantized else t
    return not (values.is_floating_point() or values.is_complex()) or bool(
        torch.isfinite(values).all()
    )


class InferRequest(BaseModel):
    """Body of ``POST /v1/infer``: ``model`` and exactly one of ``inputs``, ``token_ids``, ``text``.

    Strict types: ``"5"``, ``5.0`` or ``true`` are not token ids and ``"yes"`` is not a boolean;
    an unknown field (a misspelt ``return_logits``, say) is refused rather than ignored.
    """

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    inputs: Any = None
    token_ids: list[int] | None = None
    text: UnicodeStr | list[UnicodeStr] | None = None
    return_logits: bool = True


class RequestError(Exception):
    """A request the server rejects with ``status`` (4xx) and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def request_rows(
    served: ServedModel, req: InferRequest, max_elements: int
) -> tuple[list[Tensor], bool]:
    """Validate a request's payload; return its rows (one batcher request each) and whether the
    payload was a batch of rows (``RequestError`` if it is invalid)."""
    given = [k for k in ("inputs", "token_ids", "text") if getattr(req, k) is not None]
    if len(given) != 1:
        raise RequestError(
            422, f"send exactly one of 'inputs', 'token_ids', 'text'; got {given or 'none'}"
        )
    if served.kind == "lm":
        return [_lm_input(cast(PiMoELM, served.module), req, max_elements)], False
    if served.kind == "text":
        return _text_input(cast(ServedEncoder, served.module), req, max_elements)
    if req.inputs is None:
        raise RequestError(
            422, f"model {req.model!r} takes 'inputs' (nested lists of shape {_shape_str(served)})"
        )
    return _tensor_input(served, req.inputs, max_elements)


def _lm_input(model: PiMoELM, req: InferRequest, max_elements: int) -> Tensor:
    if req.inputs is not None:
        raise RequestError(
            422, f"model {req.model!r} is a language model: send 'token_ids' or 'text'"
        )
    if isinstance(req.text, list):
        raise RequestError(
            422, f"model {req.model!r} is a language model: send one 'text' string, not a list"
        )
    data = req.text.encode("utf-8") if req.text is not None else None
    if data is not None and len(data) > max_elements:  # before a list of that many ints
        raise RequestError(413, f"request has {len(data)} tokens; the limit is {max_elements}")
    ids = list(data) if data is not None else req.token_ids
    assert ids is not None
    cfg = model.config
    if len(ids) > max_elements:
        raise RequestError(413, f"request has {len(ids)} tokens; the limit is {max_elements}")
    if not 1 <= len(ids) <= cfg.block_size:
        raise RequestError(
            422, f"sequence length must be in [1, {cfg.block_size}] (block_size), got {len(ids)}"
        )
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
        raise RequestError(422, f"token ids must be in [0, {cfg.vocab_size}); got {bad[:5]}")
    return torch.tensor(ids, dtype=torch.long)


def _text_input(
    encoder: ServedEncoder, req: InferRequest, max_elements: int
) -> tuple[list[Tensor], bool]:
    """``text`` (one string, or a list of N strings) -> token ids, one batcher request per text."""
    if req.text is None:
        raise RequestError(
            422,
            f"model {req.model!r} is a text encoder: send 'text' (a string or a list of strings)",
        )
    texts = [req.text] if isinstance(req.text, str) else req.text
    if not texts:
        raise RequestError(422, "'text' is an empty list")
    rows: list[Tensor] = []
    for i, text in enumerate(texts):
        try:
            rows.append(encoder.encode_text(text))
        except ValueError as exc:
            raise RequestError(
                422, f"text[{i}]: {exc}" if isinstance(req.text, list) else str(exc)
            ) from None
        if sum(len(r) for r in rows) > max_elements:
            raise RequestError(
                413, f"request has more than {max_elements} tokens (max_request_elements)"
            )
    return rows, isinstance(req.text, list)


def _tensor_input(served: ServedModel, inputs: Any, max_elements: int) -> tuple[list[Tensor], bool]:
    """``inputs`` of shape ``input_shape`` (one row) or ``[N, *input_shape]`` (N rows)."""
    dtype = _DTYPES[served.input_dtype]
    count, depth, has_bool = _scan(inputs, max_elements)
    if count > max_elements:
        raise RequestError(
            413, f"request has more than {max_elements} elements (max_request_elements)"
        )
    if not isinstance(inputs, list) or has_bool or depth > len(served.input_shape) + 1:
        raise RequestError(
            422, f"'inputs' must be nested lists of numbers of shape {_shape_str(served)}"
        )
    try:
        x = torch.tensor(inputs, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RequestError(422, f"'inputs' is not a rectangular array of numbers ({exc})") from None
    expected = served.input_shape
    batched = x.dim() == len(expected) + 1
    row_shape = x.shape[1:] if batched else x.shape
    if len(row_shape) != len(expected) or any(
        e is not None and e != a for e, a in zip(expected, row_shape)
    ):
        raise RequestError(
            422, f"'inputs' has shape {list(x.shape)}; model expects {_shape_str(served)}"
        )
    if x.numel() == 0:
        raise RequestError(422, "'inputs' is empty")
    if not torch.isfinite(x).all():
        raise RequestError(422, "'inputs' contains NaN or infinity")
    return (list(x.unbind(0)) if batched else [x]), batched


def _scan(value: Any, limit: int) -> tuple[int, int, bool]:
    """Of nested lists: the number of non-list items (counting stops once past ``limit``), the
    deepest nesting seen and whether an item is a bool. Iterative, so any depth is safe."""
    count, depth, has_bool, stack = 0, 0, False, [(value, 0)]
    while stack and count <= limit:
        v, level = stack.pop()
        if isinstance(v, list):
            depth = max(depth, level + 1)
            stack.extend((item, level + 1) for item in v)
        else:
            count += 1
            has_bool = has_bool or isinstance(v, bool)
    return count, depth, has_bool


def _shape_str(served: ServedModel) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in served.input_shape) + "]"


def response_body(served: ServedModel, out: Any, return_logits: bool) -> dict[str, Any]:
    """The JSON fields of a result; ``ValueError`` if it holds NaN/inf (JSON cannot carry them)."""
    if not isinstance(out, Tensor):
        raise TypeError(f"served models must return a tensor, got {type(out).__name__}")
    out = out.float()
    if not torch.isfinite(out).all():
        raise ValueError("the output holds NaN or infinity")
    if served.kind == "lm":  # out: [L, V] logits
        body: dict[str, Any] = {"next_token_id": int(out[-1].argmax())}
        if return_logits:
            body.update(outputs=out.tolist(), shape=list(out.shape))
        return body
    return {"outputs": out.tolist(), "shape": list(out.shape)}


__all__ = [
    "InferRequest",
    "RequestError",
    "ServedModel",
    "UnicodeStr",
    "check_finite_weights",
    "check_unicode",
    "request_rows",
    "response_body",
]
