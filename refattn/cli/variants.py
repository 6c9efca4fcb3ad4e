"""``refattn variants``: the variants of the catalogue, their kind, core, backends and options."""

from __future__ import annotations

from .._core import COMMON_OPTIONS
from ..backends import available_backends
from ..catalog import variants
from ..cores import get_core

NAME = "variants"
HELP = "list the variants of the catalogue: kind, core, backends (* = available here), options"


def add_arguments(parser):
    parser.add_argument("--long", action="store_true", help="add each variant's summary line")


def describe() -> list:
    """One dict per variant of the catalogue, sorted by name.

    Keys: ``name``, ``kind`` ("core" or "layer"), ``core``, ``projection`` (layers;
    ``"-"`` for cores), ``backends`` (implemented), ``options`` (the core's keyword
    options), ``summary``.

    >>> rows = {r["name"]: r for r in describe()}
    >>> rows["mha-super"]["kind"], rows["mha-super"]["core"], rows["mha-super"]["projection"]
    ('layer', 'sdpa', 'super')
    >>> "causal_align" in rows["sdpa"]["options"]
    True
    """
    rows = []
    for name, v in sorted(variants().items()):
        projection = "-"
        if v.kind == "layer":
            projection = v.cases("default", "float64")[0].fn.scheme.name
        rows.append({"name": name, "kind": v.kind, "core": v.core, "projection": projection,
                     "backends": tuple(v.backends),
                     "options": tuple(get_core(v.core).options), "summary": v.summary})
    return rows


def run(args) -> int:
    usable = set(available_backends())
    rows = describe()
    table = [("variant", "kind", "core", "projection", "backends", "options")]
    for r in rows:
        backends = " ".join(b + ("*" if b in usable else "") for b in r["backends"])
        table.append((r["name"], r["kind"], r["core"], r["projection"], backends,
                      ", ".join(r["options"])))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]) - 1)]
    for j, t in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)) + "  " + t[-1])
        if j == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * len(t[-1]))
        elif args.long:
            print(f"    {rows[j - 1]['summary']}")
    common = " and ".join(f"{o}=" for o in COMMON_OPTIONS)
    print(f"\n{len(rows)} variants; * = backend available on this machine. Options are the "
          f"keyword options of the core (a layer passes them through: Attention(..., "
          f"**core_options)); every core also takes {common}.")
    return 0
