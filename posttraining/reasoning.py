"""Thinking traces for data.math_problems' seven kinds (report §5.1's reasoning data, at nano scale): steps a small
character-level model carries out one token at a time, as a pupil does on paper (Lee et al., "Teaching Arithmetic to
Small Transformers": the format of the steps matters more than the model's size). Signs are settled first, so that the
arithmetic is always on sizes; numbers are added, subtracted and multiplied column by column from the ones, carries and
borrows written; two numbers are compared digit by digit from the left; a remainder is found by long division, each
step counting the divisor's multiples past the number. Every clause that holds a relation is a true statement Python
can evaluate ("15-8=7", "4 < 9"), and each trace ends with the answer.

    thinking(next(math_problems()))   # "What is -45 + 38?": "45 vs 38: 4 > 3, so -45 + 38 = -(45 - 38): 15-8=7,
                                      #                      4-1-3=0, so -7"
"""


def ones_first(n):
    """The digits of n >= 0, ones first."""
    return [int(c) for c in reversed(str(n))]


def add_columns(p, q):
    """p + q (p, q >= 0), a column at a time from the ones: "x+y=s", or "x+y+1=s" with the carry."""
    a, b, carry, steps = ones_first(p), ones_first(q), 0, []
    for i in range(max(len(a), len(b))):
        x, y = a[i] if i < len(a) else 0, b[i] if i < len(b) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+1={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    return ", ".join(steps)


def subtract_columns(p, q):
    """p - q (p >= q >= 0), a column at a time from the ones: "x-y=d", or "1x-y=d" borrowing ten, "x-1-y=d" after a
    borrow."""
    a, b, borrow, steps = ones_first(p), ones_first(q), 0, []
    for i, x in enumerate(a):
        y = b[i] if i < len(b) else 0
        low = x - borrow < y
        top = f"1{x}" if low else f"{x}"
        steps.append(f"{top}-1-{y}={10 * low + x - 1 - y}" if borrow else f"{top}-{y}={10 * low + x - y}")
        borrow = int(low)
    return ", ".join(steps)


def multiply_columns(m, n):
    """m * n (0 <= m <= 9, n >= 0), a column of n at a time from the ones: "m*y=p", then "p+c=s" with the carry."""
    carry, steps = 0, []
    for y in ones_first(n):
        p = m * y
        steps.append(f"{m}*{y}={p}" + (f", {p}+{carry}={p + carry}" if carry else ""))
        carry = (p + carry) // 10
    return ", ".join(steps)


def compare_sizes(p, q, written=str):
    """p and q >= 0 written to equal width (leading zeros) and compared digit by digit from the left, up to the first
    that differs. -> (text, "<" | "=" | ">")."""
    sp, sq = written(p), written(q)
    sp, sq = sp.rjust(len(sq), "0"), sq.rjust(len(sp), "0")
    steps, relation = [], "="
    for x, y in zip(sp, sq):
        if x != ".":
            relation = "<" if x < y else ">" if x > y else "="
            steps.append(f"{x} {relation} {y}")
            if relation != "=":
                break
    return f"{sp} vs {sq}: " + ", ".join(steps), relation


def compare(x, y, written=str):
    """x against y, signed: a negative number is below any other; two negative ones compare as their sizes, reversed.
    -> (text ending "so x R y", R)."""
    if (x < 0) != (y < 0):
        if x < 0:
            return f"{written(x)} < 0 <= {written(y)}", "<"
        return f"{written(y)} < 0 <= {written(x)}", ">"
    text, relation = compare_sizes(abs(x), abs(y), written)
    if x < 0:
        relation = {"<": ">", ">": "<", "=": "="}[relation]
    return f"{text}, so {written(x)} {relation} {written(y)}", relation


def signed_sum(x, y, written):
    """x + y (written as the question writes it, e.g. "45 - -23") reduced to a sum or a difference of sizes, then in
    columns. With mixed signs the sizes are compared first (the non-negative one's against the other's): the larger
    comes first in the difference and gives the result its sign."""
    if (x < 0) == (y < 0):
        sizes = f"{abs(x)} + {abs(y)}"
        reduced, columns, compared = (f"-({sizes})" if x < 0 else sizes), add_columns(abs(x), abs(y)), ""
    else:
        plus, minus = (x, -y) if y < 0 else (y, -x)
        text, relation = compare_sizes(plus, minus)
        big, small = (plus, minus) if relation != "<" else (minus, plus)
        sizes = f"{big} - {small}"
        reduced, columns, compared = (f"-({sizes})" if relation == "<" else sizes), subtract_columns(big, small), \
            f"{text}, so "
    equation = written if reduced == written else f"{written} = {reduced}"
    return f"{compared}{equation}: {columns}, so {x + y}"


def product(m, n):
    """m * n (|m| <= 12): the sign first, then the sizes, |m| >= 10 as 10 * |n| + (|m| - 10) * |n|."""
    if m == 0 or n == 0:
        return f"{m}*{n} = 0, so 0"
    M, N = abs(m), abs(n)
    head = f"{m}*{n}" + (f" = -({M}*{N})" if m * n < 0 else f" = {M}*{N}" if m < 0 else "")
    if M < 10:
        return f"{head}: {multiply_columns(M, N)}, so {m * n}"
    r = M - 10
    if r == 0:
        return f"{head}: 10*{N}={10 * N}, so {m * n}"
    part = f"1*{N}={N}" if r == 1 else f"{r}*{N}: {multiply_columns(r, N)}, so {r * N}"
    total = f"{10 * N}+{r * N}"
    total = f"-({total})" if m * n < 0 else total
    return f"{head}: 10*{N}={10 * N}, {part}; {total}: {add_columns(10 * N, r * N)}, so {m * n}"


def remainder(n, d):
    """n mod d by long division: digits brought down from the left until the number reaches d, then at each step the
    multiples of d counted past it, the last one that fits taken away; the remainder is what is left at the end."""
    digits, steps = str(n), []
    part, i = int(digits[0]), 1
    while part < d and i < len(digits):
        part, i = 10 * part + int(digits[i]), i + 1
    while True:
        fits = part // d * d
        counted = " ".join(str(d * j) for j in range(1, part // d + 2))
        steps.append(f"{part}: {counted}>{part}, {part}-{fits}={part - fits}")
        if i == len(digits):
            return f"{n} mod {d}: {'; '.join(steps)}; so {part - fits}"
        part, i = 10 * (part - fits) + int(digits[i]), i + 1


def solve(k, v, b, c):
    """k*v + b = c: k*v = c - b (written with the question's signs), then v = (c - b) / k with the sign rule."""
    written = f"{c} {'+' if b < 0 else '-'} {abs(b)}"
    rhs, x = c - b, (c - b) // k
    if rhs == 0:
        division = f"{v} = 0/{k} = 0"
    else:
        sizes = f"{abs(rhs)}/{abs(k)}"
        division = f"{v} = {rhs}/{k} = " + (f"-({sizes})" if rhs * k < 0 else sizes) + f" = {x}" \
            if rhs < 0 or k < 0 else f"{v} = {sizes} = {x}"
    return f"{k}*{v} = {written}, {signed_sum(c, -b, written)}; {division}"


def thinking(problem):
    """The trace of a data.math_problems problem, from its kind and operands."""
    kind, operands = problem.kind, problem.operands
    if kind == "sum":
        a, b = operands
        return signed_sum(a, b, f"{a} + {b}")
    if kind == "difference":
        a, b = operands
        return signed_sum(a, -b, f"{a} - {b}")
    if kind == "product":
        return product(*operands)
    if kind == "bigger":                     # tenths: the question writes a / 10
        a, b = operands
        text, relation = compare(a, b, lambda t: str(t / 10))
        return f"{text}, so {max(a, b) / 10}"
    if kind == "less":
        text, relation = compare(*operands)
        return f"{text}, so {relation == '<'}"
    if kind == "remainder":
        return remainder(*operands)
    return solve(*operands)
