"""lme4's formula language: `y ~ fixed + (expr | group) + (expr || group) + ...`.

The bar terms are found and removed here; the fixed part that remains goes to patsy. Expansion follows lme4:

    (1 | a/b)       -> (1 | a) + (1 | a:b)
    (1 + x || g)    -> (1 | g) + (0 + x | g)       independent terms
    (x | g)         -> intercept and slope with an unstructured covariance

A syntax error raises FormulaError with the formula and a caret under the offending character. '^' means a
power, as in R ('I(x^2)', '(a + b)^2'); it is rewritten to patsy's and Python's '**'.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

import patsy

from ..errors import FormulaError
from .safety import is_dotted_name

__all__ = ["RandomSpec", "ParsedFormula", "parse_formula"]


@dataclass(frozen=True)
class RandomSpec:
    """One random-effects term after expansion: columns `expr` varying by the factor `group`."""

    expr: str  # patsy right-hand side for the columns, e.g. "1 + Days", "0 + Days"
    group: tuple[str, ...]  # the grouping factor: one variable, or several for an interaction a:b
    source: str  # the bar term as written, for messages

    @property
    def group_name(self) -> str:
        return ":".join(self.group)


@dataclass(frozen=True)
class ParsedFormula:
    response: str
    fixed: str  # patsy formula "response ~ rhs"
    random: tuple[RandomSpec, ...]
    offsets: tuple[str, ...] = ()  # the fixed formula's I(expr) terms that are offset(expr) terms of the formula


def parse_formula(formula: str) -> ParsedFormula:
    if not isinstance(formula, str):
        raise FormulaError(f"formula must be a string like 'y ~ x + (1 | g)'; got {type(formula).__name__}.")
    return _parse_text(str(formula))  # (a str subclass as plain text: the cache keys on the text)


@functools.lru_cache(maxsize=512)  # a function of the text alone (refits, bootstraps, one formula over many frames)
def _parse_text(formula: str) -> ParsedFormula:
    # R quotes non-syntactic names with backticks (`my x`); patsy's way is Q("my x"). A quoted name may hold any
    # character ('+', '|', '^', '~'): each is set aside under a plain placeholder while the structure is read.
    formula, quoted = _hide_quoted(_backticks_to_q(formula))
    # In lme4's language '^' is a power, both inside I() (I(x^2)) and for terms ((a + b)^2); in Python (and
    # so in patsy) it is xor, which would silently give another model. Translate it.
    formula = formula.replace("^", "**")
    # R's as.factor(x) is factor(x) (formula/factor.py); Python would read `as.factor` as an attribute of `as`
    formula = re.sub(r"(?<![\w.])as\.factor\s*\(", "factor(", formula)
    # R's Boundary.knots of bs() and ns(), include.lowest and dig.lab of cut() (a dotted keyword is no Python),
    # and its %in% (formula/vectors.py)
    formula = re.sub(r"(?<![\w.])(Boundary|include|dig)\.(knots|lowest|lab)(?=\s*=)", r"\1_\2", formula)
    formula = _in_operator(formula)
    parsed = _parse(formula)
    _check_repeated_terms(parsed.random)
    return _restore_quoted(parsed, quoted)


def _parse(formula: str) -> ParsedFormula:
    tilde = _top_level(formula, "~")
    if len(tilde) != 1:
        pos = tilde[1] if len(tilde) > 1 else len(formula)
        raise FormulaError(_pointed(formula, pos, "a formula needs exactly one '~' between response and terms"))
    response = formula[: tilde[0]].strip()
    if not response:
        raise FormulaError(_pointed(formula, 0, "the formula has no response before '~'"))
    rhs_start = tilde[0] + 1
    rhs = formula[rhs_start:]
    _check_parentheses(formula)
    bars = []  # (start, end) of each bar term in formula coordinates
    random = []
    depth, open_at = 0, None
    for i, ch in enumerate(rhs):
        pos = rhs_start + i
        if ch == "(":
            depth += 1
            if depth == 1:
                open_at = pos
        elif ch == ")":
            depth -= 1
            if depth == 0:
                inner = formula[open_at + 1 : pos]
                if _top_level(inner, "|"):
                    bars.append((open_at, pos + 1))
                    random.extend(_expand(formula, open_at + 1, inner))
        elif ch == "|" and depth == 0:
            raise FormulaError(_pointed(formula, pos, "a random-effects term must be in parentheses, e.g. '(1 | g)'"))
    fixed_rhs = _remove_spans(formula, bars, rhs_start)
    fixed_rhs, offsets = _offset_terms(fixed_rhs)
    if response.startswith("cbind(") and response.endswith(")"):
        raise FormulaError(
            f"{response!r}: a cbind(successes, failures) response is for glmer's binomial family; lmer takes one "
            "numeric response."
        )
    # arithmetic on the left-hand side (incidence/size, Reaction/2) is evaluated as R does: patsy would read it
    # as a formula of terms
    lhs = f"I({response})" if any(_top_level(response, op) for op in "+-*/") else response
    return ParsedFormula(response, f"{lhs} ~ {fixed_rhs}", tuple(random), offsets)


def _offset_terms(rhs: str) -> tuple[str, tuple[str, ...]]:
    """The fixed right-hand side with each top-level offset(expr) term written I(expr), and those I() terms:
    the design takes them out of the fixed effects and adds them to the offset (R's offset() in a formula)."""
    out, offsets, i, depth = [], [], 0, 0
    while i < len(rhs):
        ch = rhs[i]
        if depth == 0 and rhs.startswith("offset(", i) and (i == 0 or not (rhs[i - 1].isalnum() or rhs[i - 1] in "._")):
            end = i + len("offset(")
            level = 1
            while end < len(rhs) and level:
                level += {"(": 1, ")": -1}.get(rhs[end], 0)
                end += 1
            term = f"I({rhs[i + len('offset(') : end - 1].strip()})"
            offsets.append(term)
            out.append(term)
            i = end
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        out.append(ch)
        i += 1
    return "".join(out), tuple(offsets)


def _expand(formula, offset, inner) -> list[RandomSpec]:
    bars = _top_level(inner, "|")
    first = bars[0]
    double = len(bars) >= 2 and bars[1] == first + 1
    if len(bars) > (2 if double else 1):
        raise FormulaError(_pointed(formula, offset + bars[2 if double else 1], "one '|' (or '||') per term"))
    expr = inner[:first].strip()
    group = inner[first + (2 if double else 1) :].strip()
    source = f"({inner.strip()})"
    if not expr:
        raise FormulaError(
            _pointed(formula, offset + first, "nothing before '|': write '(1 | g)' for a random intercept")
        )
    if not group:
        raise FormulaError(_pointed(formula, offset + first, "no grouping factor after '|'"))
    groups = _expand_groups(formula, offset + inner.index(group), group)
    exprs = _split_independent(formula, offset, expr) if double else [expr]
    return [RandomSpec(e, g, source) for g in groups for e in exprs]


def _hide_quoted(formula: str) -> tuple[str, dict]:
    """formula with every Q("name") replaced by a placeholder identifier, and placeholder -> name."""
    prefix = "quotedname"
    while prefix in formula:
        prefix += "x"
    quoted = {}

    def hide(match):
        double, single = match.groups()
        key = f"{prefix}{len(quoted)}"
        quoted[key] = json.loads(f'"{double}"') if double is not None else single
        return key

    return re.sub(r'Q\(\s*"((?:[^"\\]|\\.)*)"\s*\)|Q\(\s*\'([^\']*)\'\s*\)', hide, formula), quoted


def _restore_quoted(parsed: ParsedFormula, quoted: dict) -> ParsedFormula:
    """The placeholders back: Q("name") in expressions, the plain name as a grouping factor."""
    if not quoted:
        return parsed
    pattern = re.compile("|".join(sorted(map(re.escape, quoted), key=len, reverse=True)))

    def restore(text):
        return pattern.sub(lambda m: "Q(" + json.dumps(quoted[m.group(0)], ensure_ascii=False) + ")", text)

    random = tuple(
        RandomSpec(restore(r.expr), tuple(quoted.get(g, g) for g in r.group), restore(r.source)) for r in parsed.random
    )
    return ParsedFormula(
        restore(parsed.response), restore(parsed.fixed), random, tuple(restore(o) for o in parsed.offsets)
    )


def _check_repeated_terms(random) -> None:
    """The same random-effects term twice gives two variances that the data cannot tell apart."""
    seen = set()
    for r in random:
        key = ("".join(r.expr.split()), r.group)
        if key in seen:
            raise FormulaError(
                f"the random-effects term {r.source} appears more than once; repeated terms are "
                "unidentifiable (their variances cannot be told apart). Write it once."
            )
        seen.add(key)


def _backticks_to_q(formula: str) -> str:
    if formula.count("`") % 2:
        raise FormulaError(_pointed(formula, formula.rindex("`"), "unclosed backtick"))
    return re.sub(r"`([^`]*)`", lambda m: "Q(" + json.dumps(m.group(1), ensure_ascii=False) + ")", formula)


_FACTOR_OF_NAME = re.compile(r"(?<![\w.])factor\(\s*([\w.]+)\s*\)")  # (as.factor( is factor( by now: _parse_text)


def _expand_groups(formula, offset, group) -> list[tuple[str, ...]]:
    """`a/b/c` -> a, b:a, c:b:a (lme4 writes the nested factor first, which sets its name and level labels);
    `a:b` -> the interaction as written; names must be plain variables or quoted (`my group`, set aside by
    _hide_quoted)."""
    # (1 | factor(id)) as (1 | id): a grouping is a factor already (lme4 1.1-31 refuses it: "couldn't evaluate
    # grouping factor factor(id) within model frame")
    group = _FACTOR_OF_NAME.sub(r"\1", group)
    for bad in "+*-()":
        if bad in group:
            raise FormulaError(
                _pointed(
                    formula,
                    offset + group.index(bad),
                    f"'{bad}' is not allowed in a grouping factor; use '/' for nesting "
                    "('a/b') or ':' for an interaction ('a:b'), and separate crossed "
                    "factors into their own terms ('(1 | a) + (1 | b)')",
                )
            )
    levels = [part.strip() for part in group.split("/")]
    out = []
    for k in range(1, len(levels) + 1):
        names = tuple(n.strip() for lv in reversed(levels[:k]) for n in lv.split(":"))
        for n in names:
            if not (n.isidentifier() or is_dotted_name(n)):  # R's dotted names (school.id) are names too
                raise FormulaError(
                    _pointed(formula, offset + group.find(n) if n else offset, f"{n!r} is not a variable name")
                )
        out.append(names)
    return out


def _split_independent(formula, offset, expr) -> list[str]:
    """lme4's `||`: the intercept (if any) and every other term get their own independent term."""
    try:
        desc = patsy.ModelDesc.from_formula("~ " + expr)
    except patsy.PatsyError as exc:
        raise FormulaError(_pointed(formula, offset, f"cannot read {expr!r}: {exc}")) from None
    out = []
    intercept = any(not t.factors for t in desc.rhs_termlist)
    if intercept:
        out.append("1")
    out.extend(f"0 + {t.name()}" for t in desc.rhs_termlist if t.factors)
    return out


def _remove_spans(formula, spans, rhs_start) -> str:
    """The right-hand side with the bar terms (and the '+' joining them) taken out."""
    kept, last = [], rhs_start
    for start, end in spans:
        kept.append(formula[last:start])
        last = end
    kept.append(formula[last:])
    pieces = [p.strip() for p in "".join(kept).split("+")]
    # Splitting on '+' is safe only at the top level; rebuild by joining non-empty pieces.
    text = " + ".join(p for p in pieces if p)
    return text if text else "1"


def _top_level(text, char) -> list[int]:
    out, depth = [], 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == char and depth == 0:
            out.append(i)
    return out


def _check_parentheses(formula):
    stack = []
    for i, ch in enumerate(formula):
        if ch == "(":
            stack.append(i)
        elif ch == ")":
            if not stack:
                raise FormulaError(_pointed(formula, i, "this ')' has no matching '('"))
            stack.pop()
    if stack:
        raise FormulaError(_pointed(formula, stack[-1], "this '(' is never closed"))


def _in_operator(formula: str) -> str:
    """R's `x %in% values` written isin(x, values), the operands read as R binds them (a name, a number, a string,
    a call or a parenthesized expression on each side; %in% binds tighter than arithmetic and comparisons)."""
    while (at := formula.find("%in%")) >= 0:
        start, end = _operand_before(formula, at), _operand_after(formula, at + 4)
        if start is None or end is None:
            raise FormulaError(_pointed(formula, at, '%in% needs a value on each side, as in I(f %in% c("a", "b"))'))
        left, right = formula[start:at].strip(), formula[at + 4 : end].strip()
        formula = f"{formula[:start]}isin({left}, {right}){formula[end:]}"
    return formula


_WORD = re.compile(r"[\w.]")


def _operand_before(text: str, end: int) -> int | None:
    i = end - 1
    while i >= 0 and text[i].isspace():
        i -= 1
    if i < 0:
        return None
    if text[i] in "\"'":
        opening = text.rfind(text[i], 0, i)
        return None if opening < 0 else opening
    if text[i] == ")":
        depth = 0
        while i >= 0:
            depth += {"(": -1, ")": 1}.get(text[i], 0)
            if depth == 0:
                break
            i -= 1
        if i < 0:
            return None
        i -= 1  # a call's name before its parentheses
    elif not _WORD.match(text[i]):
        return None
    while i >= 0 and _WORD.match(text[i]):
        i -= 1
    return i + 1


def _operand_after(text: str, start: int) -> int | None:
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i == len(text):
        return None
    if text[i] in "\"'":
        closing = text.find(text[i], i + 1)
        return None if closing < 0 else closing + 1
    while i < len(text) and _WORD.match(text[i]):
        i += 1
    if i < len(text) and text[i] == "(":
        depth = 0
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                return i
        return None
    return i if i > start and not text[start:i].isspace() else None


def _pointed(formula, pos, message) -> str:
    return f"{message}:\n    {formula}\n    {' ' * max(pos, 0)}^"
