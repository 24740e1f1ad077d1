"""Tables of the paper from attack summaries: Table 1 (main results), Table 3 (UCA vs OCA),
Table 4 (defences under attack).

Inputs are the flat dicts of :meth:`calib.attacks.AttackResult.summary`, each extended with
``model`` and ``setting`` (e.g. "square-linf"). Tables are pandas DataFrames written as CSV
(machine-readable) and Markdown (for the README and the report), atomically.
"""

from __future__ import annotations

import html
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from calib.io import write_text

#: Order of the attack kinds in every table and figure.
KIND_ORDER = ("uca", "oca", "mma", "rca")
#: Order of the attack settings in the report's pivots (others follow in order of appearance).
SETTING_ORDER = ("square-linf", "square-l2", "pgd-linf")


def setting_name(method: str, norm: str) -> str:
    """"square" + "linf" -> "square-linf" (the label used in tables and file names)."""
    return f"{method}-{norm}"


#: Table column -> the summary key it is read from, for the columns that carry a 95% interval
#: (``<column>_lo`` / ``<column>_hi`` beside them when the summary has ``<key>_lo``/``_hi``).
INTERVAL_COLUMNS: dict[str, str] = {
    "acc_before": "accuracy_before", "acc_after": "accuracy_after",
    "conf_before": "confidence_before", "conf_after": "confidence_after",
    "ece_before": "ece_before", "ece_after": "ece_after",
    "ks_before": "ks_before", "ks_after": "ks_after", "success_rate": "success_rate",
}


def _with_intervals(row: dict[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with ``<column>_lo`` / ``_hi`` right after each of its interval columns."""
    out: dict[str, Any] = {}
    for column, value in row.items():
        out[column] = value
        key = INTERVAL_COLUMNS.get(column)
        if key is not None and f"{key}_lo" in summary:
            out[f"{column}_lo"] = summary[f"{key}_lo"]
            out[f"{column}_hi"] = summary[f"{key}_hi"]
    return out


def label_flips(summaries: Iterable[Mapping[str, Any]]) -> str:
    """One line on labels kept across attack runs; a warning naming every run that flipped one.

    SPEC §10 "measured, not assumed": ``label_preserved`` comes from a fresh forward pass
    (:func:`calib.attacks.base.reevaluate`), so a flip is possible (e.g. a reduced query
    precision, or a defended model whose output moves between passes). It is counted and
    shown, and the run's flipped samples count as failures; it does not stop the stage.

    Args:
        summaries: dicts with ``setting``, ``kind``, ``n`` and ``label_preserved`` (a rate),
            as :meth:`calib.attacks.AttackResult.summary` gives them.
    """
    rows = list(summaries)
    flipped = [f"{s['setting']}/{s['kind']}: {round((1 - s['label_preserved']) * s['n'])} "
               f"of {s['n']}" for s in rows if s["label_preserved"] < 1.0]
    if not flipped:
        return f"labels kept in every run ({len(rows)} runs, re-read in a fresh forward pass)"
    message = ("predicted labels changed (counted as failed attacks): " + "; ".join(flipped))
    warnings.warn(message, UserWarning, stacklevel=2)
    return message


def table1(summaries: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Main results (paper Table 1): per model x setting x attack, before -> after.

    Columns: model, setting, attack, accuracy/confidence/ECE/KS before and after, success
    rate, mean queries over all samples, mean and median queries over successful ones, and
    the mean L-inf and L2 norms of the perturbations.
    """
    rows = []
    for s in summaries:
        rows.append(_with_intervals({
            "model": s["model"], "setting": s["setting"], "attack": s["kind"].upper(),
            "acc_before": s.get("accuracy_before"), "acc_after": s.get("accuracy_after"),
            "conf_before": s["confidence_before"], "conf_after": s["confidence_after"],
            "ece_before": s.get("ece_before"), "ece_after": s.get("ece_after"),
            "ks_before": s.get("ks_before"), "ks_after": s.get("ks_after"),
            "success_rate": s["success_rate"], "queries_mean": s["queries_mean"],
            "queries_success_mean": s["queries_success_mean"],
            "queries_success_median": s["queries_success_median"],
            "linf_mean": s.get("linf_mean"), "l2_mean": s.get("l2_mean"),
        }, s))
    df = pd.DataFrame(rows)
    return _sorted(df)


def table3(summaries: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """UCA vs OCA query efficiency (paper Table 3): queries over successes and success rate."""
    rows = [_with_intervals({
        "model": s["model"], "setting": s["setting"], "attack": s["kind"].upper(),
        "success_rate": s["success_rate"],
        "queries_success_mean": s["queries_success_mean"],
        "queries_success_median": s["queries_success_median"],
        "queries_mean": s["queries_mean"],
    }, s) for s in summaries if s["kind"] in ("uca", "oca")]
    return _sorted(pd.DataFrame(rows))


def table4(summaries: Iterable[Mapping[str, Any]], *,
           defence_order: Sequence[str] | None = None) -> pd.DataFrame:
    """Defences under attack (paper Table 4): per model x defence x setting x attack.

    Inputs are the summaries of :func:`calib.defences.evaluate.evaluate_defence` (attack
    summaries with ``model``, ``defence``, ``setting`` and ``white_box`` added).

    Columns: model, defence, setting, attack, white_box (how white-box PGD got its gradients
    through the defence: "exact", "bpda", ...; empty for black-box settings), accuracy /
    confidence / ECE / KS before (the defended model on the clean images) and after the
    attack, success rate and mean queries.

    Args:
        summaries: flat dicts, one per (model, defence, setting, attack).
        defence_order: order of the defences within a model; defences not listed follow in
            order of first appearance (default: first appearance throughout).
    """
    rows = [_with_intervals({
        "model": s["model"], "defence": s["defence"], "setting": s["setting"],
        "attack": s["kind"].upper(), "white_box": s.get("white_box"),
        "acc_before": s.get("accuracy_before"), "acc_after": s.get("accuracy_after"),
        "conf_before": s["confidence_before"], "conf_after": s["confidence_after"],
        "ece_before": s.get("ece_before"), "ece_after": s.get("ece_after"),
        "ks_before": s.get("ks_before"), "ks_after": s.get("ks_after"),
        "success_rate": s["success_rate"], "queries_mean": s["queries_mean"],
    }, s) for s in summaries]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    listed = list(defence_order or [])
    seen = listed + [d for d in dict.fromkeys(df["defence"]) if d not in listed]
    rank = {d: i for i, d in enumerate(seen)}
    kinds = {k.upper(): i for i, k in enumerate(KIND_ORDER)}
    df = df.assign(_d=df["defence"].map(rank), _k=df["attack"].map(kinds))
    df = df.sort_values(["model", "_d", "setting", "_k"], kind="stable")
    return df.drop(columns=["_d", "_k"]).reset_index(drop=True)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    order = {k.upper(): i for i, k in enumerate(KIND_ORDER)}
    df = df.assign(_k=df["attack"].map(order)).sort_values(["model", "setting", "_k"])
    return df.drop(columns="_k").reset_index(drop=True)


def interval_columns(df: pd.DataFrame) -> list[Any]:
    """Columns ``m`` of ``df`` that come with ``m_lo`` and ``m_hi`` (flat columns only)."""
    names = {c for c in df.columns if isinstance(c, str)}
    return [c for c in df.columns
            if isinstance(c, str) and f"{c}_lo" in names and f"{c}_hi" in names]


def merge_intervals(df: pd.DataFrame, *, formats: Mapping[Any, str] | None = None,
                    digits: int | None = None) -> pd.DataFrame:
    """Each ``m``, ``m_lo``, ``m_hi`` triple as one text column ``m``: "0.435 [0.412, 0.459]".

    The CSV files keep the three numbers apart (for ``make compare`` and plots); the Markdown
    tables and the report show them this way. Each number is written in its column's format
    (``formats`` by column, else :func:`column_format`; ``digits`` fixes decimals instead).
    """
    columns = interval_columns(df)
    if not columns:
        return df
    out = df.copy()
    for column in columns:
        if digits is not None:
            fmt = "{:." + str(digits) + "f}"
        else:
            fmt = FORMATS.get((formats or {}).get(column) or column_format(column, df[column]),
                              "{:.3f}")

        out[column] = [_cell_text(v, lo, hi, fmt) for v, lo, hi in
                       zip(df[column], df[f"{column}_lo"], df[f"{column}_hi"], strict=True)]
        out = out.drop(columns=[f"{column}_lo", f"{column}_hi"])
    return out


def to_markdown(df: pd.DataFrame, *, digits: int = 3) -> str:
    """A GitHub Markdown table with numbers rounded to ``digits`` (intervals merged: "v [lo,
    hi]", :func:`merge_intervals`)."""
    df = merge_intervals(df, digits=digits)
    return df.to_markdown(index=False, floatfmt=f".{digits}f", missingval="-") + "\n"


def write_table(df: pd.DataFrame, stem: str | os.PathLike[str], *, digits: int = 4) -> None:
    """Write ``stem``.csv and ``stem``.md atomically."""
    stem = Path(stem)
    write_text(stem.with_suffix(".csv"), df.to_csv(index=False, float_format=f"%.{digits}f"))
    write_text(stem.with_suffix(".md"), to_markdown(df, digits=3))


# --------------------------------------------------------------------------------------------
# Tables as the report shows them: display names, no index, formatted numbers, one HTML table
# per DataFrame (``show_table`` in a notebook's last line; calib.site renders its text/html).

#: Defences in the order of the paper's Table 4 (undefended, post-hoc, training-time), with the
#: names a reader sees. Defences not listed keep their key and follow in order of appearance.
DEFENCE_NAMES: dict[str, str] = {
    "none": "Undefended",
    "temperature": "Temperature scaling",
    "spline": "Spline recalibration",
    "cs": "Compression Scaling",
    "aaa": "AAA",
    "mdts": "MDTS",
    "finetune": "Fine-tuning (control)",
    "label_smoothing": "Label smoothing",
    "dca": "DCA",
    "sam": "SAM",
    "pgd_at": "PGD-AT",
    "caat": "CAAT",
    "robustbench": "RobustBench model (own weights)",
}

#: Column keys with a name of their own; other keys are spelled out by :func:`display_name`.
DISPLAY_NAMES: dict[str, str] = {
    "model": "Model", "arch": "Architecture", "family": "Family", "setting": "Setting",
    "attack": "Attack", "kind": "Attack", "defence": "Defence", "white_box": "PGD gradients",
    "acc_before": "Accuracy before", "acc_after": "Accuracy after",
    "conf_before": "Confidence before", "conf_after": "Confidence after",
    "queries_mean": "Queries (mean)", "queries_success_mean": "Queries to success (mean)",
    "queries_success_median": "Queries to success (median)",
    "linf_mean": "L∞ norm (mean)", "linf_max": "L∞ norm (max)", "l2_mean": "L2 norm (mean)",
    "label_preserved": "Labels kept", "parameters_m": "Parameters (M)",
    "n": "Images", "n_pairs": "Pairs", "bound": "Bound 1 − q/K",
    "fraction_of_bound": "Share of the bound", "measured here": "Measured here",
    "eps": "ε", "build s": "Build (s)", "attacks s": "Attacks (s)",
}

_WORDS: dict[str, str] = {
    "ece": "ECE", "ks": "KS", "nll": "NLL", "auroc": "AUROC", "lid": "LID", "uca": "UCA",
    "oca": "OCA", "mma": "MMA", "rca": "RCA", "pgd": "PGD", "linf": "L∞", "l2": "L2",
    "iou": "IoU", "acc": "accuracy", "conf": "confidence", "frac": "share", "n": "number of",
    "s": "(s)",
}
#: Values shown by name in the columns of these keys.
_VALUE_NAMES: dict[str, Mapping[str, str]] = {
    "defence": DEFENCE_NAMES,
    "kind": {k: k.upper() for k in (*KIND_ORDER, "clean")},
}
_PERCENT_KEYS = ("success_rate", "label_preserved", "fraction_of_bound")
_INTEGER_KEYS = ("n", "n_pairs", "imbalance_ratio", "epochs", "iterations", "best_epoch",
                 "budget", "curve_queries", "classes")
_NUMBER_TEXT = re.compile(r"[-+−]?(\d[\d,]*(\.\d*)?|\.\d+)(e[-+]?\d+)?%?(\s*[\[(].*[\])])?|[–-]")

#: Text columns whose cells are all at most this long are labels, never broken across lines.
_SHORT_TEXT = 24
#: How a column's numbers are written: 3 decimals, percent, integer, 1 or 2 decimals, as-is.
FORMATS: dict[str, str] = {"decimal": "{:.3f}", "percent": "{:.1%}", "integer": "{:,.0f}",
                           "one": "{:,.1f}", "two": "{:.2f}", "general": "{:g}"}


def _key(column: Any) -> str:
    """A column's key: its last non-empty level for MultiIndex columns."""
    if isinstance(column, tuple):
        return next((str(k) for k in reversed(column) if str(k) != ""), "")
    return str(column)


def display_name(key: Any) -> str:
    """The header a reader sees for a column key: "ece_after" -> "ECE after"."""
    key = _key(key)
    if key in DISPLAY_NAMES:
        return DISPLAY_NAMES[key]
    if key.lower() in (*KIND_ORDER, "clean") and key == key.lower():
        return key.upper() if key != "clean" else "Clean"
    if not re.fullmatch(r"[a-z0-9_ ]+", key):
        return key  # already a display name ("UCA", "square-linf", "Accuracy")
    words = [_WORDS.get(w, w) for w in re.split(r"[_ ]+", key) if w]
    text = " ".join(words)
    return text[:1].upper() + text[1:] if text else key


def column_format(key: Any, values: pd.Series) -> str:
    """The :data:`FORMATS` entry for a column, from its key and values."""
    key = _key(key)
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return "text"
    if (key in _PERCENT_KEYS or key.endswith(("_success_rate", "_success", "_free_successes"))
            or key.startswith("frac_")):
        return "percent"
    whole = values.dropna()
    if pd.api.types.is_integer_dtype(values) or (
            key in _INTEGER_KEYS and bool((whole == whole.round()).all())):
        return "integer"
    if "queries" in key or key.endswith((" s", "_s", "seconds")):
        return "one"
    if key in ("parameters_m",):
        return "two"
    if key in ("eps", "eps_linf", "eps_l2"):
        return "general"
    return "decimal"


def format_cell(value: Any, fmt: str, key: Any = None) -> str:
    """One cell as text: numbers in ``fmt`` (:data:`FORMATS`), missing values as an en dash."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    names = _VALUE_NAMES.get(_key(key))
    if isinstance(value, str):
        return names.get(value, value) if names else value
    if fmt in FORMATS and isinstance(value, int | float):
        return FORMATS[fmt].format(value)
    return str(value)


def _is_number_text(text: str) -> bool:
    return bool(_NUMBER_TEXT.fullmatch(text.strip()))


def _header_rows(columns: Sequence[tuple[str, ...]], classes: Sequence[str]) -> list[str]:
    """``<tr>`` rows of a header with ``len(columns[0])`` levels: a column's label sits at its
    last non-empty level and spans the levels below it (rowspan); equal consecutive labels of
    the levels above are one group cell (colspan).
    """
    depth = len(columns[0]) if columns else 1

    def last(col: tuple[str, ...]) -> int:
        return max((k for k, c in enumerate(col) if c != ""), default=0)

    rows: list[str] = []
    for level in range(depth):
        cells, i = [], 0
        while i < len(columns):
            col = columns[i]
            if last(col) < level:  # under a label that spans down to here
                i += 1
                continue
            label = html.escape(display_name(col[level]) if last(col) == level
                                else str(col[level]))
            if last(col) == level:
                span = f' rowspan="{depth - level}"' if depth - level > 1 else ""
                align = classes[i].split()[0]
                cells.append(f'<th class="{align}"{span} scope="col">{label}</th>')
                i += 1
                continue
            j = i + 1
            while (j < len(columns) and columns[j][:level + 1] == col[:level + 1]
                   and last(columns[j]) > level):
                j += 1
            span = f' colspan="{j - i}"' if j - i > 1 else ""
            cells.append(f'<th class="group"{span} scope="colgroup">{label}</th>')
            i = j
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return rows


def _verdict_class(text: str) -> str:
    return " verdict verdict-" + re.sub(r"[^a-z]+", "-", text.lower()).strip("-")


def _index_as_columns(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a plain position index: an unnamed integer index (row positions, even those
    a filter left) is dropped, any other index becomes the first column(s)."""
    unnamed = all(n is None for n in df.index.names)
    if unnamed and (isinstance(df.index, pd.RangeIndex)
                    or pd.api.types.is_integer_dtype(df.index.dtype)):
        return df.reset_index(drop=True)
    return df.reset_index()


def html_table(df: pd.DataFrame, *, caption: str | None = None,
               formats: Mapping[Any, str] | None = None, default: str | None = None) -> str:
    """A DataFrame as the report shows it: one HTML table in its own scroll box.

    No index (row positions, even those a filter left, are dropped; a named or non-integer
    index becomes the first column(s)), the
    headers by :func:`display_name` (MultiIndex columns become grouped header rows), numbers
    formatted per column (:func:`column_format`; ``formats`` overrides by column, ``default``
    for every numeric column, else ``df.attrs["format"]`` if set), text left- and numbers
    right-aligned, every row shown.
    """
    df = merge_intervals(_index_as_columns(df), formats=formats)
    columns = [c if isinstance(c, tuple) else (c,) for c in df.columns]
    depth = max((len(c) for c in columns), default=1)
    columns = [tuple("" if pd.isna(x) else str(x) for x in c) + ("",) * (depth - len(c))
               for c in columns]
    formats = dict(formats or {})
    default = default or df.attrs.get("format")  # e.g. set by table4_pivot for its values
    fmts, cells = [], []
    for pos, key in enumerate(df.columns):
        values = df.iloc[:, pos]
        fmt = formats.get(key) or (default if default and pd.api.types.is_numeric_dtype(
            values) and not pd.api.types.is_bool_dtype(values) else None)
        fmt = fmt or column_format(key, values)
        fmts.append(fmt)
        cells.append([format_cell(v, fmt, key) for v in values.tolist()])
    classes = []
    for fmt, texts in zip(fmts, cells, strict=True):
        numeric = fmt != "text" or (texts and all(_is_number_text(t) for t in texts))
        short = all(len(t) <= _SHORT_TEXT for t in texts)  # labels: kept on one line
        classes.append("num" if numeric else "text short" if short else "text")
    out = ['<div class="table-wrap"><table class="report-table">']
    if caption:
        out.append(f"<caption>{html.escape(caption)}</caption>")
    out.append("<thead>" + "".join(_header_rows(columns, classes)) + "</thead><tbody>")
    verdicts = [_key(k) == "verdict" for k in df.columns]  # coloured as on the site's index
    for row in zip(*cells, strict=True) if cells else ():
        out.append("<tr>" + "".join(
            f'<td class="{c}{_verdict_class(t) if v else ""}">{html.escape(t)}</td>'
            for c, t, v in zip(classes, row, verdicts, strict=True)) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


class Table:
    """A DataFrame shown as :func:`html_table` (``text/html``) and as a plain-text table."""

    def __init__(self, df: pd.DataFrame, **options: Any) -> None:
        self.df = df
        self.options = options

    def _repr_html_(self) -> str:
        return html_table(self.df, **self.options)

    def __repr__(self) -> str:
        caption = self.options.get("caption")
        df = _index_as_columns(self.df)
        text = df.to_string(index=False, max_rows=None, max_cols=None, float_format="{:.3f}".format)
        return f"{caption}\n{text}" if caption else text


def show_table(df: pd.DataFrame, *, caption: str | None = None,
               formats: Mapping[Any, str] | None = None, default: str | None = None) -> Table:
    """What a notebook shows for a table: the last line of a cell, or ``display(...)``."""
    return Table(df, caption=caption, formats=formats, default=default)


#: The metrics of Table 4 the report shows as pivots (:func:`table4_pivot`), with their names.
TABLE4_METRICS: dict[str, str] = {
    "ece": "ECE per defence, clean and after each attack",
    "ks": "KS error per defence, clean and after each attack",
    "conf": "average confidence per defence, clean and after each attack",
    "success_rate": "attack success rate per defence",
    "queries_mean": "mean queries per image per defence",
}


def table4_pivot(t4: pd.DataFrame, metric: str = "ece", *, white_box: bool = False,
                 worst: bool = False, intervals: bool = True) -> pd.DataFrame:
    """One metric of Table 4 as defence x (setting, attack): a row per defence in
    :data:`DEFENCE_NAMES` order, per setting a column per attack after a "clean" column (the
    defended model on the clean images) for the metrics that have one.

    Args:
        t4: :func:`table4` rows of one model.
        metric: "ece", "ks", "conf", "acc" (before/after pairs), "success_rate" or
            "queries_mean".
        white_box: add the "PGD gradients" column (how white-box PGD got through the defence).
        worst: one column per setting for the attacks, the highest value any of them reached.
        intervals: cells "value [lo, hi]" where Table 4 has the metric's 95% interval.
    """
    if t4.empty:
        raise ValueError("Table 4 is empty: nothing to pivot")
    if "model" in t4 and t4["model"].nunique() > 1:
        raise ValueError("Table 4 holds several models; pivot one model at a time")
    after = f"{metric}_after" if f"{metric}_after" in t4 else metric
    if after not in t4:
        raise ValueError(f"Table 4 has no column {after!r}")
    before = f"{metric}_before" if f"{metric}_before" in t4 else None
    listed = [d for d in DEFENCE_NAMES if d in set(t4["defence"])]
    defences = listed + [d for d in dict.fromkeys(t4["defence"]) if d not in listed]
    settings = [s for s in SETTING_ORDER if s in set(t4["setting"])]
    settings += [s for s in dict.fromkeys(t4["setting"]) if s not in settings]
    kinds = {k.upper(): i for i, k in enumerate(KIND_ORDER)}
    attacks = sorted(dict.fromkeys(t4["attack"]), key=lambda a: kinds.get(a, len(kinds)))
    out = pd.DataFrame({("defence", ""): defences})
    if white_box:
        wb = t4.dropna(subset=["white_box"]).groupby("defence")["white_box"].first()
        out[("white_box", "")] = [wb.get(d) for d in defences]
    for setting in settings:
        part = t4[t4["setting"] == setting]
        if before:
            clean = part.groupby("defence")[before].first()
            out[(setting, "clean")] = [clean.get(d) for d in defences]
        values = part.pivot_table(index="defence", columns="attack", values=after,
                                  aggfunc="first")
        if worst:
            top = values.max(axis=1)
            out[(setting, "worst attack")] = [top.get(d) for d in defences]
            continue
        bounds = {}
        if intervals and f"{after}_lo" in part and f"{after}_hi" in part:
            bounds = {end: part.pivot_table(index="defence", columns="attack",
                                            values=f"{after}_{end}", aggfunc="first")
                      for end in ("lo", "hi")}
        for attack in attacks:
            col = values[attack] if attack in values else pd.Series(dtype=float)
            cells = [col.get(d) for d in defences]
            if bounds and attack in bounds["lo"]:
                fmt = FORMATS["percent" if metric == "success_rate" else "decimal"]
                cells = [_interval_text(v, bounds["lo"][attack].get(d),
                                        bounds["hi"][attack].get(d), fmt)
                         for v, d in zip(cells, defences, strict=True)]
            out[(setting, attack)] = cells
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    out.attrs["format"] = ("percent" if metric == "success_rate" else
                           "one" if metric.startswith("queries") else "decimal")
    return out


def _cell_text(value: Any, lo: Any, hi: Any, fmt: str) -> str:
    """A merged interval cell: "v [lo, hi]", "v" without bounds, an en dash without a value."""
    if value is None or pd.isna(value):
        return "–"
    text = _interval_text(value, lo, hi, fmt)
    return text if isinstance(text, str) else fmt.format(value)


def _interval_text(value: Any, lo: Any, hi: Any, fmt: str) -> Any:
    """``value [lo, hi]`` in ``fmt``; the value alone (a number) when a bound is missing."""
    if value is None or pd.isna(value) or lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return value
    return f"{fmt.format(value)} [{fmt.format(lo)}, {fmt.format(hi)}]"
