"""Computation experts: an exact arithmetic engine, the text-to-computation module, the
arithmetic task with its byte-level span convention, and :class:`ComputationExpert`."""

from pimoe.compute.engine import ERROR_KINDS, ArithmeticEngine, ComputeResult
from pimoe.compute.expert import NO_OUTPUT, ComputationExpert, next_result_bytes
from pimoe.compute.task import CALL_END, CALL_START, ArithmeticTask, Problem, encode_batch, lm_batch, pretty
from pimoe.compute.text_to_computation import to_expression

__all__ = [
    "CALL_END",
    "CALL_START",
    "ERROR_KINDS",
    "NO_OUTPUT",
    "ArithmeticEngine",
    "ArithmeticTask",
    "ComputationExpert",
    "ComputeResult",
    "Problem",
    "encode_batch",
    "lm_batch",
    "next_result_bytes",
    "pretty",
    "to_expression",
]
