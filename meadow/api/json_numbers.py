"""Bounds on a number being written (a JSON schema's minimum, maximum and their exclusive forms): whether some number
that begins with the digits so far can still lie within them, so a reply never writes itself into a dead end. Exact
arithmetic on the decimal text (Fractions), and no exponents: "1e" could still become anything."""

from __future__ import annotations

from fractions import Fraction

Bound = tuple[Fraction, bool]  # (value, exclusive)


def within(text: str, lower: Bound | None, upper: Bound | None) -> bool:
    """Whether the whole number `text` lies within the bounds (bounded numbers have no exponent: `text` stays short
    to read exactly)."""
    if lower is None and upper is None:
        return True
    return _meets((Fraction(text), True), (Fraction(text), True), lower, upper)


def reachable(text: str, integer: bool, lower: Bound | None, upper: Bound | None) -> bool:
    """Whether a number beginning with `text` (a sign, digits, maybe a point and more digits) can lie within the
    bounds: the numbers it may still become are a union of intervals, checked one by one."""
    if lower is None and upper is None:
        return True
    negative = text.startswith("-")
    whole, point, fraction = text.lstrip("-").partition(".")
    if not whole:  # only the sign so far
        intervals = [((None, True), (Fraction(0), True))] if negative else []
    elif point:  # the digits after the point so far fix the number to within one unit of the last of them
        low = Fraction(f"{whole}.{fraction}" if fraction else whole)
        intervals = [((low, True), (low + Fraction(1, 10 ** len(fraction)), False))]
    elif whole == "0":
        intervals = [((Fraction(0), True), (Fraction(0 if integer else 1), integer))]
    else:  # more digits may follow: x, then 10x to 10x + 9, then 100x...
        x, intervals = int(whole), []
        largest = _largest(lower, upper, negative)
        for k in range(len(whole), 400):
            low, high = x * 10 ** (k - len(whole)), (x + 1) * 10 ** (k - len(whole))
            if largest is not None and low > largest:
                break
            intervals.append(((Fraction(low), True), (Fraction(high - 1 if integer else high), integer)))
            if largest is None:
                intervals.append(((Fraction(high), True), (None, True)))  # and everything above
                break
    if negative and whole:
        intervals = [((None if high is None else -high, high_closed), (-low, low_closed))
                     for (low, low_closed), (high, high_closed) in intervals]  # fmt: skip
    return any(_meets(low, high, lower, upper) for low, high in intervals)


def _largest(lower: Bound | None, upper: Bound | None, negative: bool) -> Fraction | None:
    """The largest size (absolute value) a number of this sign may have within the bounds (None: unbounded)."""
    bound = lower if negative else upper
    return None if bound is None else abs(bound[0])


def _meets(low, high, lower: Bound | None, upper: Bound | None) -> bool:
    """Whether the interval from `low` to `high` ((value or None for infinite, closed)) meets the bounds."""
    if lower is not None:
        low = max(low, (lower[0], not lower[1]), key=_rank_low)
    if upper is not None:
        high = min(high, (upper[0], not upper[1]), key=_rank_high)
    (a, a_closed), (b, b_closed) = low, high
    if a is None or b is None:
        return True
    return a < b or a == b and a_closed and b_closed


def _rank_low(end):
    value, closed = end
    return (float("-inf") if value is None else value, not closed)  # an open end at the same value is higher


def _rank_high(end):
    value, closed = end
    return (float("inf") if value is None else value, closed)  # an open end at the same value is lower
