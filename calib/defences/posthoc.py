"""Post-hoc recalibration methods evaluated under calibration attacks (SPEC §8, paper Table 4).

Every method maps logits (N, K) to logits (N, K) and shares one interface:

* ``fit(logits, labels) -> self`` on validation logits (N, K) and labels (N,);
* ``__call__(logits) -> logits``, on the logits' device and dtype;
* ``params() -> dict`` of plain numbers for the metrics JSON.

None of them changes a predicted label. :class:`CalibratedModel` puts a recalibrator behind a
classifier so that attacks query the defended model (images in [0, 1] -> recalibrated logits).

Methods:
    * :class:`TemperatureScaling` (Guo et al. 2017, "On calibration of modern neural networks").
    * :class:`SplineCalibration` (Gupta et al. 2021, "Calibration of neural networks using
      splines").
    * :class:`CompressionScaling` (Obadinma et al., the paper's proposal; SPEC §8 Decision).
    * :class:`AAA` (Chen et al. 2022, "Adversarial attack on attackers: post-process to
      mitigate black-box score-based query attacks").
    * :class:`MDTS` (Yu et al. 2022, "Robust calibration with multi-domain temperature
      scaling").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import nn

from calib.checks import check_bool, check_int, check_number

__all__ = [
    "AAA",
    "MDTS",
    "MDTS_FEATURES",
    "POSTHOC",
    "CalibratedModel",
    "CompressionScaling",
    "Recalibrator",
    "SplineCalibration",
    "TemperatureScaling",
    "compression_target",
    "fit_temperature",
    "logit_features",
    "make_recalibrator",
]


# ---------------------------------------------------------------------------------------------
# Input checks and shared helpers
# ---------------------------------------------------------------------------------------------

def _check_logits(logits: torch.Tensor, name: str = "logits") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, K), got {type(logits)}")
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"{name} must have shape (N, K) with K >= 2, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {logits.dtype}")
    return logits


def _check_fit_inputs(logits: torch.Tensor, labels: torch.Tensor, name: str = "logits"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated float64 CPU logits (N, K) and int64 CPU labels (N,) for fitting."""
    z = _check_logits(logits, name).detach().to("cpu", torch.float64)
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor of shape (N,), got {type(labels)}")
    y = labels.detach().to("cpu").reshape(-1)
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {y.dtype}")
    y = y.long()
    if y.numel() != z.shape[0] or y.numel() == 0:
        raise ValueError(
            f"labels must be non-empty with one entry per row of {name}: "
            f"{y.numel()} labels vs {z.shape[0]} rows")
    if (y < 0).any() or (y >= z.shape[1]).any():
        raise ValueError(f"labels must lie in [0, {z.shape[1] - 1}]")
    if not torch.isfinite(z).all():
        raise ValueError(f"{name} must be finite")
    return z, y


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *,
                    log_t_bounds: tuple[float, float] = (-5.0, 5.0)) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    The NLL is convex in 1/T, hence unimodal in log T, so a bounded Brent search over log T is
    exact up to its tolerance, needs no learning rate and is deterministic.

    Args:
        logits: (N, K) validation logits.
        labels: (N,) integer labels.
        log_t_bounds: search interval for log T (default: T in [0.0067, 148]).

    Returns:
        T > 0 as a float.
    """
    z, y = _check_fit_inputs(logits, labels)
    lo, hi = log_t_bounds
    if not lo < hi:
        raise ValueError(f"log_t_bounds must satisfy low < high, got {log_t_bounds}")

    def objective(log_t: float) -> float:
        return float(F.cross_entropy(z * math.exp(-log_t), y))

    res = minimize_scalar(objective, bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-7})
    return float(math.exp(res.x))


def _top_two(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 value, top-2 value) of each row, both (N,)."""
    vals = logits.topk(2, dim=-1).values
    return vals[:, 0], vals[:, 1]


class Recalibrator:
    """Base class of the post-hoc methods: ``fit``, ``__call__`` and ``params``."""

    #: Short name used in :data:`POSTHOC` and in result files.
    name: str = ""

    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> Recalibrator:
        """Fit on validation logits (N, K) and labels (N,); returns ``self``."""
        _check_fit_inputs(logits, labels)
        return self

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Fitted parameters and options as plain numbers (for the metrics JSON)."""
        return {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.params().items()
                          if not isinstance(v, list | dict))
        return f"{type(self).__name__}({inner})"


def _require_fitted(obj: Recalibrator, attribute: str) -> None:
    if getattr(obj, attribute) is None:
        raise RuntimeError(f"{type(obj).__name__} is not fitted; call fit(logits, labels) first")


# ---------------------------------------------------------------------------------------------
# Temperature scaling
# ---------------------------------------------------------------------------------------------

class TemperatureScaling(Recalibrator):
    """Temperature scaling (Guo et al. 2017): ``z -> z / T`` with one T fit by validation NLL.

    Differentiable (T is a constant), so white-box attacks go straight through it.

    Args:
        log_t_bounds: search interval for log T.

    Example:
        >>> ts = TemperatureScaling().fit(val_logits, val_labels)
        >>> calibrated = ts(test_logits)  # (N, K)
    """

    name = "temperature"

    def __init__(self, *, log_t_bounds: tuple[float, float] = (-5.0, 5.0)) -> None:
        self.log_t_bounds = log_t_bounds
        self.temperature: float | None = None

    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> TemperatureScaling:
        self.temperature = fit_temperature(logits, labels, log_t_bounds=self.log_t_bounds)
        return self

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        _require_fitted(self, "temperature")
        return _check_logits(logits) / self.temperature

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


# ---------------------------------------------------------------------------------------------
# Spline calibration
# ---------------------------------------------------------------------------------------------

def _natural_cubic_basis(t: torch.Tensor, knots: torch.Tensor, derivative: bool = False
                         ) -> torch.Tensor:
    """Natural cubic spline basis (Hastie et al., ESL eq. 5.4-5.5) at ``t`` (M,) -> (M, K).

    N_1 = 1, N_2 = t, N_{k+2} = d_k - d_{K-1} with
    d_k(t) = ((t - xi_k)_+^3 - (t - xi_K)_+^3) / (xi_K - xi_k); linear beyond the boundary
    knots (zero second derivative there), which is what makes the spline "natural".
    With ``derivative=True`` the basis of the first derivative is returned instead.
    """
    xi_last = knots[-1]

    def d(k: int) -> torch.Tensor:
        a = (t - knots[k]).clamp_min(0)
        b = (t - xi_last).clamp_min(0)
        if derivative:
            return 3 * (a**2 - b**2) / (xi_last - knots[k])
        return (a**3 - b**3) / (xi_last - knots[k])

    n_knots = knots.numel()
    cols = [torch.zeros_like(t) if derivative else torch.ones_like(t),
            torch.ones_like(t) if derivative else t]
    d_last = d(n_knots - 2)
    cols += [d(k) - d_last for k in range(n_knots - 2)]
    return torch.stack(cols, dim=-1)


def _fractile(conf: torch.Tensor, sorted_conf: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear empirical CDF of the validation confidences evaluated at ``conf``.

    The i-th smallest validation confidence (0-based) sits at fractile (i + 1) / n; values
    outside the validation range are clamped to the end fractiles 1/n and 1.

    Args:
        conf: (N,) confidences.
        sorted_conf: (n,) sorted validation confidences.
    """
    n = sorted_conf.numel()
    fr = torch.arange(1, n + 1, device=conf.device, dtype=conf.dtype) / n
    count = torch.searchsorted(sorted_conf, conf.detach(), right=True)  # #{s <= c}
    lo = (count - 1).clamp(0, n - 1)
    hi = count.clamp(0, n - 1)
    x0, x1 = sorted_conf[lo], sorted_conf[hi]
    gap = x1 - x0
    w = torch.where(gap > 0, (conf - x0) / gap.clamp_min(torch.finfo(conf.dtype).tiny), 0.0)
    return fr[lo] + w.clamp(0, 1) * (fr[hi] - fr[lo])


def _rebuild_logits(log_probs: torch.Tensor, new_conf: torch.Tensor) -> torch.Tensor:
    """Log-probabilities with the top class at ``new_conf`` and the rest sharing 1 - new_conf.

    The other classes keep their relative probabilities. ``new_conf`` is raised, if needed,
    to just above the smallest value that keeps the predicted class on top: with top-2
    probability p_2 and c the old confidence, class 2 stays below iff
    c' > p_2 / (1 - c + p_2) (a bound that never exceeds 1/2 and is at least 1/K).

    Args:
        log_probs: (N, K) log-softmax of the original logits (float64).
        new_conf: (N,) the desired confidence of the predicted class.
    """
    # exp(-700) is still a normal float64: the floor keeps every output finite even for
    # logits whose softmax underflows.
    log_probs = log_probs.clamp_min(-700.0)
    top_lp, top_idx = log_probs.max(-1)
    is_top = F.one_hot(top_idx, log_probs.shape[1]).bool()
    log_rest = log_probs.masked_fill(is_top, -math.inf).logsumexp(-1)  # log(1 - c)
    second_lp = log_probs.masked_fill(is_top, -math.inf).max(-1).values
    conf, second = top_lp.exp(), second_lp.exp()
    lower = second / (log_rest.exp() + second)
    lower = lower + 1e-3 * (conf - lower)  # strictly above the tie point
    new_conf = torch.maximum(new_conf.clamp_max(1.0 - 1e-12), lower)
    shift = torch.log1p(-new_conf) - log_rest
    out = log_probs + shift[:, None]
    return torch.where(is_top, new_conf.log()[:, None], out)


class SplineCalibration(Recalibrator):
    """Spline recalibration (Gupta et al. 2021, "Calibration of neural networks using splines").

    Fitting: sort the validation samples by confidence s_(1) <= ... <= s_(n) with correctness
    a_(i); the cumulative calibration error E(t_i) = sum_{j<=i} (a_(j) - s_(j)) / n is a
    function of the fractile t_i = i / n. A natural cubic spline S with ``n_knots`` equally
    spaced knots on [0, 1] is fit to it by least squares. Since dt = 1/n, the slope S'(t) is
    the local (accuracy - confidence) gap, so the calibrated confidence of a sample at
    fractile t with confidence c is c + S'(t).

    Applying: a test confidence c is mapped to its fractile in the validation distribution
    (piecewise-linear empirical CDF, clamped at the ends), c' = c + S'(t) is clipped to
    [1/K, 1], and logits are rebuilt as log-probabilities: the predicted class at c', the
    others sharing 1 - c' in proportion to their original probabilities. The argmax is kept
    (c' is raised just enough where the clip alone would let the runner-up overtake it).
    The released code interpolates the validation (score, calibrated score) pairs instead of
    going through the fractile; the two agree inside the validation range.

    Differentiable almost everywhere (the fractile is piecewise linear in c).

    Args:
        n_knots: number of spline knots including both ends (paper: 6).
    """

    name = "spline"

    def __init__(self, *, n_knots: int = 6) -> None:
        check_int("n_knots", n_knots, minimum=3)
        self.n_knots = n_knots
        self.knots = torch.linspace(0.0, 1.0, n_knots, dtype=torch.float64)
        self.coefficients: torch.Tensor | None = None
        self.sorted_confidences: torch.Tensor | None = None

    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> SplineCalibration:
        z, y = _check_fit_inputs(logits, labels)
        probs = z.softmax(-1)
        conf, pred = probs.max(-1)
        order = torch.argsort(conf, stable=True)
        s = conf[order]
        a = (pred == y).double()[order]
        n = s.numel()
        frac = torch.arange(1, n + 1, dtype=torch.float64) / n
        cum_err = torch.cumsum(a - s, 0) / n
        basis = _natural_cubic_basis(frac, self.knots)
        self.coefficients = torch.linalg.lstsq(basis, cum_err[:, None]).solution[:, 0]
        self.sorted_confidences = s
        return self

    def calibrated_confidence(self, confidences: torch.Tensor) -> torch.Tensor:
        """Raw recalibrated confidence c + S'(t(c)) of (N,) confidences (before clipping)."""
        _require_fitted(self, "coefficients")
        assert self.coefficients is not None and self.sorted_confidences is not None
        c = confidences.to(torch.float64)
        frac = _fractile(c, self.sorted_confidences.to(c.device))
        slope = _natural_cubic_basis(frac, self.knots.to(c.device), derivative=True)
        return c + slope @ self.coefficients.to(c.device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        _require_fitted(self, "coefficients")
        z = _check_logits(logits)
        log_probs = z.to(torch.float64).log_softmax(-1)
        k = z.shape[1]
        new_conf = self.calibrated_confidence(log_probs.max(-1).values.exp()).clamp(1.0 / k, 1.0)
        return _rebuild_logits(log_probs, new_conf).to(z.dtype)

    def params(self) -> dict[str, Any]:
        fitted = self.coefficients is not None
        return {
            "n_knots": self.n_knots,
            "knots": self.knots.tolist(),
            "coefficients": self.coefficients.tolist() if fitted else None,
            "n_val": int(self.sorted_confidences.numel()) if fitted else 0,
        }


# ---------------------------------------------------------------------------------------------
# Compression scaling
# ---------------------------------------------------------------------------------------------

def compression_target(confidence: torch.Tensor) -> torch.Tensor:
    """Target confidence c* of Compression Scaling for (N,) confidences c in [0, 1].

    b = min(floor(3c), 2) picks the source third, c* = 0.8 + b/15 + (c - b/3)/5 maps it onto
    the b-th of the top three 15-bins, [0.8 + b/15, 0.8 + (b+1)/15]. The b terms cancel
    (c* = 0.8 + c/5), so the map is continuous and strictly increasing, and c* >= c with
    equality only at c = 1.
    """
    b = torch.floor(3 * confidence).clamp(0, 2)
    return 0.8 + b / 15 + (confidence - b / 3) / 5


class CompressionScaling(Recalibrator):
    """Compression Scaling, CS (the paper's proposal; SPEC §8).

    Per input, the confidence c is mapped to c* = :func:`compression_target` (c), which lies
    in [0.8, 1], and the logits are divided by the per-input temperature T in (0, 1] whose
    softmax has maximum probability exactly c*. The maximum probability of softmax(z / T) is
    strictly decreasing in T, so T is found by vectorised bisection on log(1/T) in float64.
    Labels and the ranking of confidences are unchanged.

    **Decision** (SPEC §8): the released code uses slope 1/4, which overshoots each target bin
    and breaks the confidence order at the bin edges, and returns z when a coarse search
    misses; we use slope 1/5 and always solve.

    Nothing is fit. Differentiable with the solved T treated as a constant.

    Args:
        iterations: bisection steps (60 halve the bracket to below 1e-17 of its width).
        max_inverse_temperature: cap on 1/T; only inputs whose top two logits (nearly) tie
            need it, since their confidence cannot reach c* at any finite temperature.
    """

    name = "cs"

    def __init__(self, *, iterations: int = 60, max_inverse_temperature: float = 1e6) -> None:
        check_int("iterations", iterations, minimum=1)
        check_number("max_inverse_temperature", max_inverse_temperature, low=1, low_open=True)
        self.iterations = iterations
        self.max_inverse_temperature = float(max_inverse_temperature)

    def temperatures(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-input temperature T (N,) in (0, 1], float64, without gradient."""
        z = _check_logits(logits).detach().to(torch.float64)
        k = z.shape[1]
        conf = z.softmax(-1).max(-1).values
        target = compression_target(conf)
        top1, top2 = _top_two(z)
        margin = top1 - top2
        # 1 - c(beta) <= (K - 1) exp(-beta * margin), so this beta already reaches the target.
        beta_hi = torch.log((k - 1) / (1 - target).clamp_min(1e-300)) / margin.clamp_min(1e-300)
        beta_hi = beta_hi.clamp(1.0, self.max_inverse_temperature)
        lo = torch.zeros_like(conf)  # log beta at T = 1, where c <= c*
        hi = beta_hi.log()
        for _ in range(self.iterations):
            mid = 0.5 * (lo + hi)
            reached = (z * mid.exp()[:, None]).softmax(-1).max(-1).values >= target
            hi = torch.where(reached, mid, hi)
            lo = torch.where(reached, lo, mid)
        return torch.exp(-0.5 * (lo + hi))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        temps = self.temperatures(logits)
        return logits / temps.to(device=logits.device, dtype=logits.dtype)[:, None]

    def params(self) -> dict[str, Any]:
        return {"low": 0.8, "slope": 0.2, "iterations": self.iterations,
                "max_inverse_temperature": self.max_inverse_temperature}


# ---------------------------------------------------------------------------------------------
# AAA: adversarial attack on attackers
# ---------------------------------------------------------------------------------------------

def _aaa_adam(z: torch.Tensor, target: torch.Tensor, p1_orig: torch.Tensor, *, lr: float,
              steps: int, calib_weight: float) -> torch.Tensor:
    """AAA's inner optimisation: Adam on |m(z') - t| + w |p_1(z') - p_1o|, summed over rows.

    The same update as ``torch.optim.Adam`` (betas 0.9 / 0.999, eps 1e-8) with the loss's
    gradient written out instead of taken by autograd, which made every call 2.5-4.2x dearer
    (``benchmarks/bench_aaa.py``, 50-500 rows; AAA runs ``steps`` updates per forward, so it
    is on the attack's hot path).
    With i_1, i_2 the top two entries of z' and p = softmax(z'):
    d m / d z' = e_(i_1) - e_(i_2) and d p_1 / d z' = p_1 (e_(i_1) - p); |x|' = sign(x).

    Args:
        z: logits (N, K), detached.
        target: reflected margins t (N,).
        p1_orig: anchor confidences p_1o (N,).

    Returns:
        The optimised logits (N, K).
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    z_new = z.clone()
    exp_avg = torch.zeros_like(z)
    exp_avg_sq = torch.zeros_like(z)
    grad = torch.empty_like(z)
    for step in range(1, steps + 1):
        top = z_new.topk(2, dim=-1)
        margin_sign = torch.sign(top.values[:, 0] - top.values[:, 1] - target)
        probs = z_new.softmax(-1)
        p1 = probs.gather(-1, top.indices[:, :1])  # (N, 1)
        conf_term = (calib_weight * torch.sign(p1[:, 0] - p1_orig))[:, None] * p1
        torch.mul(probs, conf_term, out=grad).neg_()
        grad.scatter_add_(-1, top.indices,
                          torch.stack([margin_sign + conf_term[:, 0], -margin_sign], -1))
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        z_new.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
    return z_new


class AAA(Recalibrator):
    """AAA, adversarial attack on attackers (Chen et al. 2022), a per-input logit post-process.

    With logit margin m = z_(1) - z_(2), attractor a = (round(m / tau + 0.5) - 0.5) tau and
    target t = a - (m - a) (the margin reflected about its attractor), the logits are
    optimised with Adam (``lr``, ``steps``; :func:`_aaa_adam`) on |m(z') - t| +
    ``calib_weight`` |p_1(z') - p_1(z / T)|: a score-based attacker sees its progress on the
    margin reversed while the confidence is pulled to the temperature-scaled one. As in the
    released code, the anchor is the confidence at temperature ``T`` ("pre-tune it using a
    validation set"), which makes AAA a calibrator too: :meth:`fit` fits ``T`` on validation
    logits by NLL (:func:`fit_temperature`); unfitted, ``T = temperature`` (default 1, the
    raw confidence). The loss is summed over the batch, and each sample's loss depends only
    on its own logits, so every sample follows the same trajectory whatever the batch.
    A sample whose optimised argmax differs from the original keeps its original logits.

    Not differentiable end-to-end: the optimisation runs (without autograd) on a detached
    copy. By default the output carries a zero gradient with respect to the input
    logits, so white-box attacks see AAA as a gradient-masking defence; ``bpda=True``
    instead passes the gradient of the undefended logits straight through (the adaptive,
    BPDA-style attacker). Nothing is fit.

    Args:
        tau: attractor interval (paper: 4).
        lr: Adam learning rate (0.1).
        steps: Adam steps (100).
        calib_weight: weight of the confidence-preservation term (5).
        bpda: identity gradient instead of the masked (zero) one.
        temperature: the anchor's temperature until :meth:`fit` replaces it.
    """

    name = "aaa"

    def __init__(self, *, tau: float = 4.0, lr: float = 0.1, steps: int = 100,
                 calib_weight: float = 5.0, bpda: bool = False,
                 temperature: float = 1.0) -> None:
        check_number("tau", tau, low=0, low_open=True)
        check_number("lr", lr, low=0, low_open=True)
        check_int("steps", steps, minimum=0)
        check_number("calib_weight", calib_weight, low=0)
        self.tau, self.lr, self.steps = float(tau), float(lr), steps
        self.calib_weight, self.bpda = float(calib_weight), check_bool("bpda", bpda)
        self.temperature = check_number("temperature", temperature, low=0, low_open=True)
        self.fitted = False

    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> AAA:
        """Fit the anchor's temperature on validation logits (N, K) and labels (N,)."""
        self.temperature = fit_temperature(logits, labels)
        self.fitted = True
        return self

    def target_margin(self, margin: torch.Tensor) -> torch.Tensor:
        """The reflected margin t = 2a - m for logit margins m (N,)."""
        attractor = (torch.round(margin / self.tau + 0.5) - 0.5) * self.tau
        return attractor - (margin - attractor)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        z = _check_logits(logits).detach()
        with torch.no_grad():
            top1, top2 = _top_two(z)
            target = self.target_margin(top1 - top2)
            p1_orig = (z / self.temperature).softmax(-1).max(-1).values
            out = _aaa_adam(z, target, p1_orig, lr=self.lr, steps=self.steps,
                            calib_weight=self.calib_weight)
        keep = out.argmax(-1) == z.argmax(-1)
        out = torch.where(keep[:, None], out, z)
        if not logits.requires_grad:
            return out
        if self.bpda:
            return logits + (out - logits.detach())
        return out + logits * 0.0  # connected to the graph, zero gradient: masked

    def params(self) -> dict[str, Any]:
        return {"tau": self.tau, "lr": self.lr, "steps": self.steps,
                "calib_weight": self.calib_weight, "bpda": self.bpda,
                "temperature": self.temperature, "temperature_fitted": self.fitted}


# ---------------------------------------------------------------------------------------------
# MDTS: multi-domain temperature scaling
# ---------------------------------------------------------------------------------------------

#: Per-sample logit features MDTS regresses the log-temperature on.
MDTS_FEATURES: tuple[str, ...] = ("log_confidence", "logit_margin", "entropy")


def logit_features(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample features of logits (N, K) -> (N, 3): log-confidence, margin, entropy.

    Log of the max softmax probability, top-1 minus top-2 logit, and the softmax entropy.
    """
    log_probs = logits.log_softmax(-1)
    top1, top2 = _top_two(logits)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return torch.stack([log_probs.max(-1).values, top1 - top2, entropy], dim=-1)


class MDTS(Recalibrator):
    """Multi-domain temperature scaling (Yu et al. 2022), per-sample temperatures.

    :meth:`fit_domains` fits one temperature per domain by NLL (e.g. clean, UCA- and
    OCA-attacked validation subsets), then a ridge regression from per-sample logit features
    (:func:`logit_features`, standardised) to the log-temperature of the sample's domain.
    At test time each input gets T = exp(prediction), clamped to the range of the fitted
    domain temperatures, and the output is z / T. T > 0 always, so labels are unchanged.
    The original method regresses on learned representations; we use logit features so that
    any classifier's logits suffice.

    :meth:`fit` with a single (logits, labels) pair fits the clean domain only, which reduces
    MDTS to temperature scaling (the regression targets are constant).

    Differentiable: T is a smooth function of the logits and the gradient flows through it.

    Args:
        ridge: L2 penalty of the regression on the mean squared error (standardised features).
        log_t_bounds: search interval of each domain's log-temperature.
    """

    name = "mdts"

    def __init__(self, *, ridge: float = 1e-2,
                 log_t_bounds: tuple[float, float] = (-5.0, 5.0)) -> None:
        check_number("ridge", ridge, low=0)
        self.ridge = float(ridge)
        self.log_t_bounds = log_t_bounds
        self.domain_temperatures: dict[str, float] = {}
        self.weights: torch.Tensor | None = None
        self.intercept = 0.0
        self.feature_mean: torch.Tensor | None = None
        self.feature_std: torch.Tensor | None = None

    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> MDTS:
        """Clean domain only (equivalent to temperature scaling); see :meth:`fit_domains`."""
        return self.fit_domains({"clean": (logits, labels)})

    def fit_domains(self, domains: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> MDTS:
        """Fit per-domain temperatures and the feature -> log-temperature regression.

        Args:
            domains: domain name -> (logits (N_d, K), labels (N_d,)), e.g.
                ``{"clean": ..., "uca": ..., "oca": ...}``.
        """
        if not isinstance(domains, Mapping) or not domains:
            raise ValueError("domains must be a non-empty mapping name -> (logits, labels)")
        feats, targets, temps = [], [], {}
        n_classes = None
        for name, pair in domains.items():
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ValueError(f"domains[{name!r}] must be a (logits, labels) pair")
            z, y = _check_fit_inputs(pair[0], pair[1], name=f"domains[{name!r}] logits")
            if n_classes is not None and z.shape[1] != n_classes:
                raise ValueError(
                    f"domains[{name!r}] has {z.shape[1]} classes, expected {n_classes}")
            n_classes = z.shape[1]
            temps[str(name)] = fit_temperature(z, y, log_t_bounds=self.log_t_bounds)
            feats.append(logit_features(z))
            targets.append(torch.full((z.shape[0],), math.log(temps[str(name)]),
                                      dtype=torch.float64))
        x, t = torch.cat(feats), torch.cat(targets)
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-12)
        xs = (x - mean) / std
        t_mean = t.mean()
        gram = xs.T @ xs / xs.shape[0] + self.ridge * torch.eye(xs.shape[1], dtype=torch.float64)
        self.weights = torch.linalg.solve(gram, xs.T @ (t - t_mean) / xs.shape[0])
        self.intercept = float(t_mean)
        self.feature_mean, self.feature_std = mean, std
        self.domain_temperatures = temps
        return self

    def temperatures(self, logits: torch.Tensor) -> torch.Tensor:
        """Predicted per-sample temperatures (N,) in the logits' dtype, with gradient."""
        _require_fitted(self, "weights")
        assert self.weights is not None
        assert self.feature_mean is not None and self.feature_std is not None
        z = _check_logits(logits)
        dev, dt = z.device, z.dtype
        feats = (logit_features(z) - self.feature_mean.to(dev, dt)) / self.feature_std.to(dev, dt)
        log_t = self.intercept + feats @ self.weights.to(dev, dt)
        log_temps = [math.log(v) for v in self.domain_temperatures.values()]
        return log_t.clamp(min(log_temps), max(log_temps)).exp()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperatures(logits)[:, None]

    def params(self) -> dict[str, Any]:
        fitted = self.weights is not None
        return {
            "ridge": self.ridge,
            "features": list(MDTS_FEATURES),
            "domain_temperatures": dict(self.domain_temperatures),
            "weights": self.weights.tolist() if fitted else None,
            "intercept": self.intercept,
            "feature_mean": self.feature_mean.tolist() if fitted else None,
            "feature_std": self.feature_std.tolist() if fitted else None,
        }


# ---------------------------------------------------------------------------------------------
# Defended model and registry
# ---------------------------------------------------------------------------------------------

class CalibratedModel(nn.Module):
    """A classifier followed by a recalibrator: images (N, C, H, W) in [0, 1] -> logits (N, K).

    ``forward(x) = recalibrator(model(x))``, so attacks query the defended model. Gradients
    reach the input wherever the recalibrator is differentiable (TS, CS, MDTS, splines);
    through :class:`AAA` they are masked unless it was built with ``bpda=True``.

    Args:
        model: any ``nn.Module`` mapping images to logits.
        recalibrator: a fitted post-hoc method (callable logits -> logits).
    """

    def __init__(self, model: nn.Module, recalibrator: Recalibrator) -> None:
        super().__init__()
        if not callable(recalibrator):
            raise ValueError(f"recalibrator must be callable, got {type(recalibrator)}")
        self.model = model
        self.recalibrator = recalibrator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.recalibrator(self.model(x))


#: name -> post-hoc recalibrator class.
POSTHOC: dict[str, type[Recalibrator]] = {
    "temperature": TemperatureScaling,
    "spline": SplineCalibration,
    "cs": CompressionScaling,
    "aaa": AAA,
    "mdts": MDTS,
}


def make_recalibrator(name: str, **options: Any) -> Recalibrator:
    """Build the post-hoc method ``name`` (a key of :data:`POSTHOC`) with keyword ``options``.

    Raises:
        ValueError: unknown name (the message lists the allowed ones) or unknown option.
    """
    if name not in POSTHOC:
        raise ValueError(f"unknown recalibrator {name!r}; allowed: {sorted(POSTHOC)}")
    try:
        return POSTHOC[name](**options)
    except TypeError as err:
        raise ValueError(f"bad options for recalibrator {name!r}: {err}") from None
