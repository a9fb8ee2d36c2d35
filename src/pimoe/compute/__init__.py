"""Computation experts: an exact arithmetic engine, the text-to-computation module, the
arithmetic task with its byte-level span convention, :class:`ComputationExpert`, and
:class:`ComputationChain` (the same hand-off around a frozen pretrained LM)."""

from pimoe.compute.chain import MODES, ChainOutput, InferenceChain
from pimoe.compute.engine import ERROR_KINDS, ArithmeticEngine, ComputeResult
from pimoe.compute.expert import NO_OUTPUT, ComputationExpert, next_result_bytes
from pimoe.compute.handoff import HandoffRouter, router_accuracy, train_router
from pimoe.compute.llm_chain import ChainConfig, ChainRun, ComputationChain
from pimoe.compute.task import (
    CALL_END,
    CALL_START,
    ArithmeticTask,
    Problem,
    encode_batch,
    lm_batch,
    pretty,
)
from pimoe.compute.text_to_computation import to_expression
from pimoe.compute.train import TrainSettings, train_text_expert

__all__ = [
    "CALL_END",
    "CALL_START",
    "ERROR_KINDS",
    "MODES",
    "NO_OUTPUT",
    "ArithmeticEngine",
    "ArithmeticTask",
    "ChainConfig",
    "ChainOutput",
    "ChainRun",
    "ComputationChain",
    "ComputationExpert",
    "ComputeResult",
    "HandoffRouter",
    "InferenceChain",
    "Problem",
    "TrainSettings",
    "encode_batch",
    "lm_batch",
    "next_result_bytes",
    "pretty",
    "router_accuracy",
    "to_expression",
    "train_router",
    "train_text_expert",
]
