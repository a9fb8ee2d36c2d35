from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pimoe.compute.engine import ERROR_KINDS, ArithmeticEngine, ComputeResult

ENGINE = ArithmeticEngine(max_digits=60)


def _exprs() -> st.SearchStrategy[tuple[str, int]]:
    """(expression text, exact int value) over + - * with parentheses and unary minus."""
    leaf = st.integers(0, 10**12).map(lambda n: (str(n), n))

    def extend(children: st.SearchStrategy[tuple[str, int]]) -> st.SearchStrategy[tuple[str, int]]:
        binary = st.tuples(children, st.sampled_from("+-*"), children).map(
            lambda t: (
                f"({t[0][0]}{t[1]}{t[2][0]})",
                {"+": t[0][1] + t[2][1], "-": t[0][1] - t[2][1], "*": t[0][1] * t[2][1]}[t[1]],
            )
        )
        negate = children.map(lambda c: (f"-{c[0]}", -c[1]))
        return binary | negate

    return st.recursive(leaf, extend, max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(_exprs())
def test_matches_python_int_arithmetic(case: tuple[str, int]) -> None:
    text, value = case
    result = ENGINE.evaluate(text)
    assert result.ok and result.value == value
    assert ENGINE.compute(text) == str(value)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**15), 10**15), st.integers(-(10**15), 10**15), st.sampled_from("+-*/"))
def test_binary_ops_with_precedence_free_operands(a: int, b: int, op: str) -> None:
    text = f"({a}){op}({b})"
    result = ENGINE.evaluate(text)
    if op == "/" and b == 0:
        assert result == ComputeResult(ok=False, error="div0")
        return
    expected = {
        "+": Fraction(a + b),
        "-": Fraction(a - b),
        "*": Fraction(a * b),
        "/": Fraction(a, b) if b else None,
    }[op]
    assert result.ok and result.value == expected


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789+-*/() x.e", max_size=30))
def test_never_raises_on_arbitrary_input(text: str) -> None:
    result = ENGINE.evaluate(text)
    assert result.ok or result.error in ERROR_KINDS
    rendered = (
        result.render()
    )  # a value renders to text that evaluates back to it; an error to its token
    assert ENGINE.evaluate(rendered) == result if result.ok else rendered == f"<err:{result.error}>"


@pytest.mark.parametrize(
    ("text", "rendered"),
    [
        ("48213 * 907 + 12", "43729203"),
        ("2+3*4", "14"),
        ("(2+3)*4", "20"),
        ("10-4-3", "3"),
        ("100/10/5", "2"),
        ("7/2", "7/2"),
        ("-7/2", "-7/2"),
        ("--5", "5"),
        ("1/3*3", "1"),
        ("007", "7"),
        ("1/0", "<err:div0>"),
        ("5/(3-3)", "<err:div0>"),
        ("2**3", "<err:malformed>"),
        ("", "<err:malformed>"),
        ("(1+2", "<err:malformed>"),
        ("1+", "<err:malformed>"),
        ("1.5", "<err:malformed>"),
        ("__import__('os')", "<err:malformed>"),
        ("+1", "<err:malformed>"),
    ],
)
def test_examples(text: str, rendered: str) -> None:
    assert ENGINE.compute(text) == rendered


def test_digit_limit_on_operands_and_results() -> None:
    engine = ArithmeticEngine(max_digits=5)
    assert engine.compute("99999") == "99999"
    assert engine.compute("100000") == "<err:overflow>"
    assert engine.compute("000099999") == "99999"
    assert engine.compute("99999+1") == "<err:overflow>"
    assert engine.compute("999*999") == "<err:overflow>"
    assert engine.compute("999*999-999*999") == "<err:overflow>"  # intermediate past the limit
    assert engine.compute("1/100000") == "<err:overflow>"


def test_length_and_depth_limits() -> None:
    engine = ArithmeticEngine(max_len=20, max_depth=4)
    assert engine.compute("1+" * 10 + "1") == "<err:too_long>"
    assert engine.compute("(((((1)))))") == "<err:too_long>"
    assert engine.compute("((((1))))") == "1"
    assert ArithmeticEngine().compute("-" * 10_000 + "1") == "<err:too_long>"
    assert (
        ArithmeticEngine(max_len=100_000).compute("(" * 5000 + "1" + ")" * 5000) == "<err:too_long>"
    )


def test_bytes_input() -> None:
    assert ENGINE.compute(b"6*7") == "42"
    assert ENGINE.compute(b"\xff1") == "<err:malformed>"


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        ArithmeticEngine(max_digits=0)
