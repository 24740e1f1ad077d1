"""Can bf16 attack queries be made safe by confirming their decisions in fp32, and what is left?

``attack.precision: bf16`` failed ``precision_check.py`` because bf16 decides some of Square's
accept/reject steps differently from fp32 (README, "Query precision"). The way out the
precision option leaves open is to query in bf16 and re-query in fp32 only where bf16 cannot
be trusted with the decision. This script measures what that costs, on the attack stage's own
Square runs, without changing them: each (Square setting, kind) of ``params.yaml``'s attack
grid runs in fp32 as the attack stage runs it (the reference trajectory), and every batch of
candidates is also scored from bf16 autocast logits against the bf16 score of the current best
input. Per run it counts, over all candidates:

* ``accept``: the share fp32 accepts (improves the objective and keeps the label);
* ``differ``: the share where a bf16 query decides otherwise (accept vs reject, or label kept
  vs not, which also steers the backtracking);
* scheme **A**, confirm what bf16 accepts: every candidate bf16 would accept, and every one
  whose bf16 label check lies within ``--label-band`` of the threshold, is re-queried in fp32
  and decided there; what bf16 rejects stays rejected. ``A share`` is the re-queried share,
  ``A missed`` the share fp32 accepts but bf16 rejected (there the attack leaves fp32's path);
* scheme **B**, fp32's decisions exactly: re-query every candidate whose bf16 objective is not
  worse than the best's by more than delta (or whose label check is within delta of the
  threshold); ``B delta`` is the smallest delta of ``--deltas`` that misses no decision fp32
  would take differently, ``B share`` its re-queried share.

With ``r`` = bf16 forward time / fp32 forward time at the attack's batch (measured here), a
scheme that re-queries a share ``s`` costs about ``r + s`` fp32 forwards per query, so its
speed-up is at most ``1 / (r + s)`` (re-queried subsets are smaller batches, so less).

``--check`` runs scheme A for real instead (:class:`ConfirmAccepted`, a prototype that
replaces the attacks' acceptance step for the duration of the run) and puts it through
``precision_check.py``'s test: the whole attack grid (PGD too: its accepted steps are
confirmed the same way) with fp32 queries and with scheme A, clean predictions agreeing 100%
and every Table 1 number inside fp32's 95% interval; every fp32 re-query counts as a query,
and the speed-up printed is measured, not bounded.

    PYTHONPATH=. .venv/bin/python benchmarks/precision_decisions.py --model vit --images 200
    PYTHONPATH=. .venv/bin/python benchmarks/precision_decisions.py --model vit --check
    PYTHONPATH=. .venv/bin/python benchmarks/precision_decisions.py --arch resnet18 --images 16 \\
        --square-iterations 20     # random weights, any CPU (bf16 emulated where not native)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from bench_attack_stage import add_input_arguments, load_inputs  # noqa: E402
from precision_check import grid_from_params  # noqa: E402

from calib.attacks import base  # noqa: E402
from calib.precision import Precision, PrecisionModel, bf16_native  # noqa: E402

#: Candidate deltas for scheme B (objective units: log-probability for UCA/OCA, probability
#: for RCA; probability for the label margin).
DELTAS: tuple[float, ...] = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


@dataclass
class Counts:
    """Running counts over the candidates of one attack run."""

    candidates: int = 0
    accept: int = 0
    differ: int = 0
    a_requery: int = 0
    a_missed: int = 0
    b_requery: list[int] = field(default_factory=lambda: [0] * len(DELTAS))
    b_missed: list[int] = field(default_factory=lambda: [0] * len(DELTAS))
    max_logit_error: float = 0.0


def score_rows(state: base.AttackState, logits: torch.Tensor, idx: torch.Tensor
               ) -> base.Scores:
    """:func:`calib.attacks.base.score` of ``logits`` (B, K) for the samples ``idx`` (B,)."""
    return base.score(logits, state.k[idx], state.mode[idx], state.target[idx],
                      state.thresholds, state.min_margin, state.present)


def scheme_a_requery(reduced: base.Scores, best_reduced: torch.Tensor, min_margin: float,
                     label_band: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scheme A's rule, bool (B,) each: what the reduced scores would accept (improves on
    ``best_reduced`` and keeps the label), and what to re-query in fp32 (that, plus label
    checks within ``label_band`` of ``min_margin``)."""
    would = (reduced.loss < best_reduced) & reduced.keeps_label
    near = (reduced.margin - min_margin).abs() <= label_band
    return would, would | near


class DecisionObserver:
    """Scores every candidate batch of an fp32 Square run with bf16 logits as well.

    Attach with :meth:`attached`; it wraps ``AttackState.consider`` for the block and leaves
    the fp32 run itself untouched (the wrapped method is called with the fp32 logits).
    """

    def __init__(self, bf16_model: torch.nn.Module, label_band: float) -> None:
        self.bf16_model = bf16_model
        self.label_band = label_band
        self.counts = Counts()
        self._best_bf16: dict[int, torch.Tensor] = {}

    def _bf16_scores(self, state: base.AttackState, x: torch.Tensor, idx: torch.Tensor
                     ) -> tuple[base.Scores, torch.Tensor]:
        logits = self.bf16_model(x)
        return score_rows(state, logits, idx), logits

    @torch.no_grad()
    def observe(self, state: base.AttackState, idx: torch.Tensor, x_new: torch.Tensor,
                logits: torch.Tensor) -> None:
        if id(state) not in self._best_bf16:  # first candidates: x_best is still the clean input
            everyone = torch.arange(state.x_best.shape[0], device=idx.device)
            self._best_bf16[id(state)] = self._bf16_scores(state, state.x_best, everyone)[0].loss
        best_bf16 = self._best_bf16[id(state)]
        fp32 = score_rows(state, logits, idx)
        bf16, bf16_logits = self._bf16_scores(state, x_new, idx)
        accept_fp32 = (fp32.loss < state.loss[idx]) & fp32.keeps_label
        gap_bf16 = bf16.loss - best_bf16[idx]
        accept_bf16, requery_a = scheme_a_requery(bf16, best_bf16[idx], state.min_margin,
                                                  self.label_band)
        label_differs = fp32.keeps_label != bf16.keeps_label
        must_match = accept_fp32 | label_differs  # decisions a rejection must not get wrong
        near_label = (bf16.margin - state.min_margin).abs()
        c = self.counts
        c.candidates += idx.numel()
        c.accept += int(accept_fp32.sum())
        c.differ += int(((accept_fp32 != accept_bf16) | label_differs).sum())
        c.a_requery += int(requery_a.sum())
        c.a_missed += int((accept_fp32 & ~requery_a).sum())
        for i, delta in enumerate(DELTAS):
            requery_b = (gap_bf16 <= delta) | (near_label <= delta)
            c.b_requery[i] += int(requery_b.sum())
            c.b_missed[i] += int((must_match & ~requery_b).sum())
        c.max_logit_error = max(c.max_logit_error, float((bf16_logits - logits).abs().max()))
        # Follow fp32's path: an input fp32 accepts becomes the best in bf16's books too.
        best_bf16[idx[accept_fp32]] = bf16.loss[accept_fp32]

    @contextlib.contextmanager
    def attached(self) -> Iterator[Counts]:
        original = base.AttackState.consider
        observer = self

        def consider(state, idx, x_new, logits, **kwargs):
            observer.observe(state, idx, x_new, logits)
            return original(state, idx, x_new, logits, **kwargs)

        base.AttackState.consider = consider
        try:
            yield self.counts
        finally:
            base.AttackState.consider = original


class ConfirmAccepted:
    """Scheme A as the attacks' acceptance step: reduced-precision queries, fp32 decisions on
    what they would accept.

    While :meth:`attached` is active, every :class:`~calib.attacks.base.AttackState` reads
    its clean logits from the fp32 ``model`` (so the clean prediction ``k`` is fp32's), and
    each candidate batch is first scored from the reduced-precision logits the attack
    queried, against the reduced-precision score of the current best input. Candidates that
    score would accept, and those whose label check lies within ``label_band`` of the
    threshold, are re-queried in fp32 (one more query each) and accepted only if fp32 accepts
    them; every other candidate is rejected. So every accepted step, stored objective,
    confidence, margin and success is fp32's; what the reduced precision can still do is
    reject a step fp32 would have taken.

    A prototype for ``benchmarks/``: it swaps the methods of ``AttackState`` for the block.
    """

    def __init__(self, model: torch.nn.Module, label_band: float) -> None:
        self.model = model
        self.label_band = label_band
        self.candidates = 0
        self.requeried = 0

    @contextlib.contextmanager
    def attached(self) -> Iterator[ConfirmAccepted]:
        init, consider = base.AttackState.__init__, base.AttackState.consider
        rule = self

        def fp32_init(state, x, logits, **kwargs):
            with torch.no_grad():
                init(state, x, rule.model(x.detach()), **kwargs)
            everyone = torch.arange(x.shape[0], device=x.device)
            state.best_reduced = score_rows(state, logits.detach(), everyone).loss.clone()

        @torch.no_grad()
        def confirmed(state, idx, x_new, logits, *, copy_inputs=True):
            reduced = score_rows(state, logits, idx)
            would, requery = scheme_a_requery(reduced, state.best_reduced[idx],
                                              state.min_margin, rule.label_band)
            local = requery.nonzero().squeeze(1)
            accepted = torch.zeros_like(would)
            keeps = reduced.keeps_label.clone()
            rows_local = local[:0]
            if local.numel():
                sub = idx[local]
                fp32 = score_rows(state, rule.model(x_new.detach().index_select(0, local)), sub)
                ok = (fp32.loss < state.loss[sub]) & fp32.keeps_label
                accepted[local] = ok
                keeps[local] = fp32.keeps_label
                rows_local, rows = local[ok], sub[ok]
                state.loss[rows] = fp32.loss[ok]
                state.confidence[rows] = fp32.confidence[ok]
                state.margin[rows] = fp32.margin[ok]
                state.success[rows] = fp32.success[ok]
                state.best_reduced[rows] = reduced.loss[rows_local]
                state.queries[sub] += 1  # the fp32 re-query is a query
            if copy_inputs:
                state.x_best.index_copy_(0, idx[rows_local],
                                         x_new.detach().index_select(0, rows_local))
            state.queries[idx] += 1
            rule.candidates += idx.numel()
            rule.requeried += local.numel()
            return accepted, replace(reduced, keeps_label=keeps)

        base.AttackState.__init__, base.AttackState.consider = fp32_init, confirmed
        try:
            yield self
        finally:
            base.AttackState.__init__, base.AttackState.consider = init, consider


def forward_ratio(model: torch.nn.Module, bf16_model: torch.nn.Module, images: torch.Tensor,
                  batch: int, repeats: int = 3) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of one fp32 and one bf16 forward of ``batch`` images."""
    x = images[:batch]
    if x.shape[0] < batch:  # fewer images than the attack's batch: tile them
        x = x.repeat((batch + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:batch]
    seconds = []
    with torch.no_grad():
        for net in (model, bf16_model):
            net(x)  # warm-up
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                net(x)
                best = min(best, time.perf_counter() - start)
            seconds.append(best)
    return seconds[0], seconds[1]


def setup(args: argparse.Namespace) -> tuple[dict, torch.nn.Module, torch.Tensor, torch.Tensor,
                                             str]:
    """The params file's attack section (with the command line's overrides), the model, the
    images (N, C, H, W) and labels (N,) to attack, and a description of them."""
    from calib.config import load_params

    attack = load_params(args.params)["attack"]
    if args.square_iterations is not None:
        attack["square_iterations"] = args.square_iterations
    if args.kinds is not None:
        attack["kinds"] = args.kinds
    torch.set_num_threads(args.threads)
    return (attack, *load_inputs(args))


def run(args: argparse.Namespace) -> dict:
    from calib.attacks.grid import run_grid

    attack, model, images, labels, what = setup(args)
    native = bf16_native(images.device)
    bf16_model = PrecisionModel(model, Precision(
        "bf16", "bf16", images.device.type,
        "bf16 autocast" + ("" if native else " (emulated: this CPU has no native bf16)")))
    grid = replace(grid_from_params(attack), precision="fp32")
    settings = [s for s in grid.settings if s.startswith("square")]
    fp32_s, bf16_s = forward_ratio(model, bf16_model, images, args.batch)
    ratio = bf16_s / fp32_s
    print(f"{what}: {images.shape[0]} images, {args.threads} threads, Square "
          f"{grid.square_iterations} queries; bf16 {'native' if native else 'EMULATED'}; "
          f"forward of {args.batch}: fp32 {fp32_s * 1e3:.1f} ms, bf16 {bf16_s * 1e3:.1f} ms "
          f"(r = {ratio:.2f})", flush=True)
    rows = []
    for setting in settings:
        for kind in grid.kinds:
            observer = DecisionObserver(bf16_model, args.label_band)
            with observer.attached() as c:
                run_grid(model, images, labels, replace(grid, settings=setting, kinds=kind),
                         seed=args.seed, batch_size=args.batch)
            n = max(c.candidates, 1)
            exact = next((i for i, m in enumerate(c.b_missed) if m == 0), None)
            row = {
                "setting": setting, "kind": kind, "candidates": c.candidates,
                "accept": c.accept / n, "differ": c.differ / n,
                "a_share": c.a_requery / n, "a_missed": c.a_missed / n,
                "b_delta": None if exact is None else DELTAS[exact],
                "b_share": None if exact is None else c.b_requery[exact] / n,
                "b_share_by_delta": {str(d): r / n
                                     for d, r in zip(DELTAS, c.b_requery, strict=True)},
                "b_missed_by_delta": {str(d): m / n
                                      for d, m in zip(DELTAS, c.b_missed, strict=True)},
                "max_logit_error": c.max_logit_error,
            }
            row["a_speedup_bound"] = 1.0 / (ratio + row["a_share"])
            row["b_speedup_bound"] = (None if row["b_share"] is None
                                      else 1.0 / (ratio + row["b_share"]))
            rows.append(row)
            print(f"  {setting} {kind}: {c.candidates:,} candidates", flush=True)
    return {"description": what, "images": int(images.shape[0]), "threads": args.threads,
            "bf16_native": native, "fp32_forward_s": fp32_s, "bf16_forward_s": bf16_s,
            "ratio": ratio, "batch": args.batch, "label_band": args.label_band, "rows": rows}


def check(args: argparse.Namespace) -> dict:
    """Scheme A through the precision check (``precision_check.py``'s test), measured."""
    from precision_check import report

    from calib.analysis.precision import compare_precisions

    attack, model, images, labels, what = setup(args)
    rule = ConfirmAccepted(model, args.label_band)
    print(f"{what}: {images.shape[0]} images, {args.threads} threads, scheme A "
          f"(label band {args.label_band})", flush=True)
    result = compare_precisions(model, images, labels, grid_from_params(attack),
                                precision="bf16", seed=args.seed, batch_size=args.batch,
                                show_progress=True, reduced_context=rule.attached)
    record = report(args.model or args.arch, int(images.shape[0]), "bf16 + fp32 confirmation",
                    result)
    share = rule.requeried / max(rule.candidates, 1)
    print(f"fp32 re-queries: {rule.requeried:,} of {rule.candidates:,} candidates ({share:.1%})")
    return {**record, "scheme": "A", "label_band": args.label_band,
            "candidates": rule.candidates, "requeried": rule.requeried}


def table(result: dict) -> str:
    """The rows as a Markdown table."""
    lines = ["| setting | kind | candidates | fp32 accepts | bf16 decides otherwise "
             "| A: re-queried | A: fp32 accepts bf16 missed | A: speed-up at most "
             "| B: delta | B: re-queried | B: speed-up at most | max logit error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        b_delta = "none" if r["b_delta"] is None else f"{r['b_delta']:g}"
        b_share = "-" if r["b_share"] is None else f"{r['b_share']:.1%}"
        b_speed = "-" if r["b_speedup_bound"] is None else f"{r['b_speedup_bound']:.2f}x"
        lines.append(f"| {r['setting']} | {r['kind'].upper()} | {r['candidates']:,} "
                     f"| {r['accept']:.1%} | {r['differ']:.1%} | {r['a_share']:.1%} "
                     f"| {r['a_missed']:.1%} | {r['a_speedup_bound']:.2f}x | {b_delta} "
                     f"| {b_share} | {b_speed} | {r['max_logit_error']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser)
    parser.add_argument("--images", type=int, default=200,
                        help="attack the first N images (0: the whole attack split)")
    parser.add_argument("--kinds", help="override attack.kinds (e.g. uca,mma)")
    parser.add_argument("--square-iterations", type=int)
    parser.add_argument("--batch", type=int, default=512, help="the attack stage's batch")
    parser.add_argument("--label-band", type=float, default=0.02,
                        help="scheme A also re-queries candidates whose bf16 label margin is "
                             "this close to the threshold (probability units)")
    parser.add_argument("--check", action="store_true",
                        help="run scheme A through the precision check (whole grid, measured)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the result as JSON")
    args = parser.parse_args(argv)
    if args.images < 0:
        parser.error(f"--images must be >= 0, got {args.images}")
    if args.label_band < 0:
        parser.error(f"--label-band must be >= 0, got {args.label_band}")
    if args.check:
        result = check(args)
    else:
        result = run(args)
        print()
        print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
