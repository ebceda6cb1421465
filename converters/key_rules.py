"""Turn a manifest's key rules into a conversion plan: one recipe per output tensor.

The plan is built from tensor names and shapes alone (no data read), and checked on both sides:
every source tensor is consumed or dropped by a named rule, and every tensor the config implies is
produced with the expected shape. Any gap fails the conversion with the keys named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import CompletenessError, ManifestError, name_some
from .shard_reader import TensorInfo


@dataclass
class Recipe:
    """How to make one output tensor. `op`: copy | weight_norm | sum | split:I:N (row block I of N)."""

    out_key: str
    op: str
    sources: list[str]
    transpose: tuple[int, ...] | None = None
    rule: str = ""
    shape: tuple[int, ...] = ()


@dataclass
class Plan:
    recipes: dict[str, Recipe]
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> rule name
    unmatched: list[str] = field(default_factory=list)  # only filled when strict=False

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.recipes.values():
            out[r.rule or r.op] = out.get(r.rule or r.op, 0) + 1
        for rule in self.dropped.values():
            out[f"drop:{rule}"] = out.get(f"drop:{rule}", 0) + 1
        return out


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ManifestError(f"manifest rule {where}: invalid regex {pattern!r} ({e})") from None


def _group_rule(rule: dict, members: dict[str, str], kind: str):
    """Collect the sources of a multi-input rule, keyed by the output key they build."""
    groups: dict[str, dict[str, str]] = {}
    if kind == "weight_norm":
        roles = {"g": _compile(rule["g"], rule["name"]), "v": _compile(rule["v"], rule["name"])}
        for key in list(members):
            for role, rx in roles.items():
                m = rx.match(key)
                if m:
                    groups.setdefault(m.expand(rule["out"]), {})[role] = key
                    members.pop(key)
                    break
        for out, g in groups.items():
            if set(g) != {"g", "v"}:
                have = next(iter(g.values()))
                raise CompletenessError(f"weight-norm pair incomplete for {out}: have {have}, missing its "
                                        f"{'v' if 'g' in g else 'g'} tensor")
    else:  # sum
        rx = _compile(rule["pattern"], rule["name"])
        for key in list(members):
            m = rx.match(key)
            if m:
                groups.setdefault(m.expand(rule["out"]), {})[key] = key
                members.pop(key)
        for out, g in groups.items():
            if len(g) != int(rule.get("count", 2)):
                raise CompletenessError(f"rule {rule['name']}: {out} needs {rule.get('count', 2)} source "
                                        f"tensors, found {name_some(g)}")
    return groups


def _add(recipes: dict[str, Recipe], recipe: Recipe) -> None:
    """One recipe per output: two source forms of one tensor (e.g. audiocraft's plain and
    ``mha.`` attention keys side by side) are ambiguous, never silently one of them."""
    old = recipes.get(recipe.out_key)
    if old is not None:
        raise CompletenessError(f"two source tensors map to {recipe.out_key}: {old.sources[0]} and "
                                f"{recipe.sources[0]}")
    recipes[recipe.out_key] = recipe


def build_plan(source: dict[str, TensorInfo], rules: dict,
               expected: dict[str, tuple[int, ...]] | None, strict: bool = True) -> Plan:
    """Map source tensors to output recipes; raise CompletenessError listing any gap."""
    remaining = dict.fromkeys(source)  # ordered set of unconsumed source keys
    dropped: dict[str, str] = {}
    recipes: dict[str, Recipe] = {}

    source = dict(source)
    alias_map: dict[str, str] = {}  # canonical key -> the stored alternative standing in for it
    for rule in rules.get("alias", []):
        present = [a for a in rule["alternatives"] if a in remaining]
        if rule["key"] not in remaining and present:
            stand_in = present.pop(0)
            remaining.pop(stand_in)
            remaining[rule["key"]] = None
            source[rule["key"]] = source[stand_in]
            alias_map[rule["key"]] = stand_in
        for a in present:  # tied copies of a tensor that is already there
            dropped[a] = rule["name"]
            remaining.pop(a)

    for rule in rules.get("drop", []):
        rx = _compile(rule["pattern"], rule["name"])
        for key in [k for k in remaining if rx.search(k)]:
            dropped[key] = rule["name"]
            remaining.pop(key)

    for kind in ("weight_norm", "sum"):
        for rule in rules.get(kind, []):
            for out, g in _group_rule(rule, remaining, kind).items():
                srcs = [g["g"], g["v"]] if kind == "weight_norm" else sorted(g.values())
                _add(recipes, Recipe(out, kind, srcs, rule=rule["name"]))

    for rule in rules.get("split", []):  # one source tensor -> N row blocks (fused q/k/v)
        rx, outs = _compile(rule["pattern"], rule["name"]), rule["out"]
        for key in list(remaining):
            m = rx.match(key)
            if not m:
                continue
            rows = source[key].shape[0] if source[key].shape else 0
            if rows == 0 or rows % len(outs):
                raise CompletenessError(f"rule {rule['name']}: {key} has shape {source[key].shape}; its first "
                                        f"dimension must split into {len(outs)} equal blocks")
            for i, tmpl in enumerate(outs):
                _add(recipes, Recipe(m.expand(tmpl), f"split:{i}:{len(outs)}", [key], rule=rule["name"]))
            remaining.pop(key)

    renames = [(_compile(r["pattern"], r["pattern"]), r["to"]) for r in rules.get("rename", [])]
    unmatched = []
    for key in list(remaining):
        for rx, to in renames:
            m = rx.match(key)
            if m:
                _add(recipes, Recipe(m.expand(to), "copy", [key], rule="rename"))
                remaining.pop(key)
                break
        else:
            unmatched.append(key)
    if unmatched and strict:
        raise CompletenessError(f"source tensors matched by no rule (unexpected keys): {name_some(unmatched)}")

    for r in rules.get("layout", []):
        if "pattern" not in r:  # a rule naming an MLX module type needs the model's keys
            raise ManifestError(f"manifest rule {r['name']}: layout rule names module {r.get('module')!r} but no "
                                "keys; pass the rules through mlx_config.with_config_rules(rules, cfg)")
    layouts = [(_compile(r["pattern"], r["name"]), tuple(r["transpose"]), r["name"]) for r in rules.get("layout", [])]
    for r in recipes.values():
        base = source[r.sources[-1]].shape  # weight_norm: v carries the full shape
        if r.op.startswith("split:"):
            base = (base[0] // int(r.op.split(":")[2]), *base[1:])
        r.sources = [alias_map.get(s, s) for s in r.sources]
        for rx, perm, _name in layouts:
            if rx.match(r.out_key):
                if len(perm) != len(base):
                    raise CompletenessError(f"{r.out_key}: layout rule expects {len(perm)} dims, source "
                                            f"{r.sources[-1]} has shape {base}")
                r.transpose = perm
                base = tuple(base[i] for i in perm)
                break
        r.shape = tuple(base)

    if expected is not None:
        missing = [k for k in expected if k not in recipes]
        extra = [k for k in recipes if k not in expected]
        wrong = [f"{k} {recipes[k].shape} != {expected[k]}" for k in expected
                 if k in recipes and recipes[k].shape != tuple(expected[k])]
        problems = []
        if missing:
            problems.append(f"missing tensors: {name_some(missing)}")
        if extra:
            problems.append(f"unexpected tensors: {name_some(extra)}")
        if wrong:
            problems.append(f"wrong shapes: {name_some(wrong, 4)}")
        if problems:
            raise CompletenessError("checkpoint does not match its config: " + "; ".join(problems))
    return Plan(recipes={k: recipes[k] for k in sorted(recipes, key=_natural)}, dropped=dropped,
                unmatched=unmatched)


def diff_against_expected(plan: Plan, expected: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """Missing / unexpected / mis-shaped output tensors, for reports (never raises)."""
    return {
        "unmatched_source": sorted(plan.unmatched),
        "missing": sorted(k for k in expected if k not in plan.recipes),
        "unexpected": sorted(k for k in plan.recipes if k not in expected),
        "wrong_shape": sorted(f"{k} {plan.recipes[k].shape} != {tuple(expected[k])}" for k in expected
                              if k in plan.recipes and plan.recipes[k].shape != tuple(expected[k])),
    }


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]
