"""Fast tier: a linear Bradley-Terry head on standardised base-model features, refit after every label.

Model: r(x) = ((x - mean) / std) @ w + bias. For a pair, P(chosen beats rejected) = sigmoid(r_c - r_r - margin).
Fit: maximum a posteriori w under a Gaussian prior, i.e. minimise

    J(w) = sum_i softplus(margin_i - d_i @ w) + l2 / 2 * |w|^2,      d_i = z(chosen_i) - z(rejected_i),

by Newton's method (exact Hessian, line search), in the dual (n x n kernel) when there are fewer pairs than
features and in the primal (F x F) otherwise, in float64 with torch's LAPACK. The bias does not enter a pair's
probability; it is set so that the mean score of the standardisation rows is 0 (it is 0 since z is centred).

l2: given, or chosen by 5-fold cross-validation (held-out BT loss) over a grid that scales with the mean
|d|^2 of the pairs, l2 = c * mean|d|^2 for c in CV_GRID (scale-free across feature sizes and pair
similarity). Cross-validation uses at most CV_MAX_PAIRS pairs (a fixed random subset) to bound the cost;
with fewer than MIN_CV_PAIRS pairs, c = DEFAULT_C.

Uncertainty: Laplace approximation. The posterior of w is N(w*, S), S = inverse Hessian of J at w*
= (D^T W D + l2 I)^-1, W = diag(p(1-p)). score() returns the posterior std of r(x), sqrt(z^T S z);
prob_chosen() returns the moderated probability sigmoid(mu / sqrt(1 + pi s^2 / 8)) of a pair and the std s of
the score difference (for active learning: pick pairs with p near 0.5 and large s).

Refits after every label (`fit_indexed`): the pairs come as row indices into the feature rows of the distinct
completions. Identical pairs merge into one term weighted by their count (the same objective); when fewer
completions than distinct pairs take part, Newton forms D^T W D = Z^T (A^T W A) Z in completion space (C F^2
instead of n F^2; A is the +1/-1 pair incidence matrix); Newton starts from the previous fit's weights
(re-expressed on the new standardisation) and stops at the same tolerance, so the model is the one a fit from
scratch gives. The service re-chooses l2 by CV only when the pairs grew by a quarter.

Serialisation: safetensors (no pickle).
"""
from __future__ import annotations

import contextlib
import json
import math
import time

import numpy as np
import torch

from ..model_utils import safetensors_metadata
from .bt import expected_calibration_error, reliability_bins

CV_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
DEFAULT_C = 0.1
MIN_CV_PAIRS = 20
CV_FOLDS = 5
CV_MAX_PAIRS = 300
DUAL_MAX_FRACTION = 0.75     # dual (n x n) solver while n <= this * F, primal (F x F) above
FORMAT = "rlhf-studio-fast-reward"
VERSION = "1"

_F64 = torch.float64


@contextlib.contextmanager
def _one_thread():
    """Small dense problems run faster on one thread, much faster when the cores are shared; the setting is
    per calling thread under OpenMP (torch's CPU backend), so other threads' generation is not affected."""
    prev = torch.get_num_threads()
    if prev > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if prev > 1:
            torch.set_num_threads(prev)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(x)


def _as_tensor(x, name: str) -> torch.Tensor:
    """A [N, F] float tensor (float32 input stays float32, no copy) with finite values."""
    t = torch.as_tensor(x.detach().cpu() if isinstance(x, torch.Tensor) else np.asarray(x))
    if not t.is_floating_point():
        t = t.double()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    if t.ndim == 1:
        t = t[None, :]
    if t.ndim != 2:
        raise ValueError(f"{name} must be a [N, F] array, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _as_2d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a [N, F] array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _ref_moments(X_ref, F: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(rows, sum, sum of squares) per feature of the standardisation rows X_ref, in float64."""
    ref = _as_tensor(X_ref, "X_ref")
    if ref.shape[1] != F:
        raise ValueError(f"X_ref has {ref.shape[1]} features, the pairs have {F}")
    return ref.shape[0], ref.sum(0, dtype=_F64), (ref.double() ** 2).sum(0)


def _mean_std(nr: int, s1: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation from (rows, sum, sum of squares). Variances are shrunk towards
    their average: with a handful of rows a feature that happens to vary little would otherwise be blown up.
    10 pseudo-rows; negligible for real data sizes."""
    mean = s1 / nr
    var = (s2 / nr - mean ** 2).clamp(min=0)
    k0 = 10.0
    var = (nr * var + k0 * var.mean()) / (nr + k0)
    return mean, var.clamp(min=1e-12).sqrt()


def _dual_fit(K: torch.Tensor, m: torch.Tensor, lam: float, alpha: torch.Tensor | None = None,
              max_iter: int = 50, tol: float = 1e-9) -> torch.Tensor:
    """Newton in the dual: w = D^T alpha, f = K alpha. Returns alpha."""
    n = K.shape[0]
    if alpha is None:
        alpha = torch.zeros(n, dtype=_F64)
    f = K @ alpha
    obj = _softplus(m - f).sum() + 0.5 * lam * (alpha @ f)
    eye = torch.eye(n, dtype=_F64)
    for _ in range(max_iter):
        u = (f - m).clamp(-60, 60)
        p = torch.sigmoid(u)
        sw = torch.sqrt((p * (1 - p)).clamp(min=1e-12))
        rhs = sw * f + torch.exp(-u / 2)          # sqrt(W) z, z = f + (1-p)/W
        A = sw[:, None] * K * sw[None, :] + lam * eye
        L = torch.linalg.cholesky(A)
        target = sw * torch.cholesky_solve(rhs[:, None], L)[:, 0]
        direction = target - alpha
        fd = K @ direction
        t = 1.0
        while True:
            a_new, f_new = alpha + t * direction, f + t * fd
            obj_new = _softplus(m - f_new).sum() + 0.5 * lam * (a_new @ f_new)
            if obj_new <= obj + 1e-12 * abs(float(obj)) or t < 1e-4:
                break
            t *= 0.5
        done = float(obj - obj_new) <= tol * (1.0 + abs(float(obj)))
        alpha, f, obj = a_new, f_new, obj_new
        if done:
            break
    return alpha


class _DenseDesign:
    """The pair-difference rows D [n, F] held as a matrix."""

    def __init__(self, D: torch.Tensor):
        self.D, self.D32 = D, D.float()
        self.F = D.shape[1]

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        return self.D @ w

    def rmatvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.D.T @ v

    def gram(self, W: torch.Tensor) -> torch.Tensor:
        """D^T diag(W) D (accumulated in float32, like a Newton direction needs; returned as float64)."""
        return (self.D32.T @ (self.D32 * W.float()[:, None])).double()


class _IndexedDesign:
    """D = A Z without forming it: Z [C, F] are the standardised rows of the C distinct completions and A [n, C]
    has +1 at the chosen and -1 at the rejected completion of each pair. D^T diag(W) D = Z^T (A^T W A) Z costs
    C F^2 (+ C^2 F) instead of n F^2, a large saving when completions take part in many pairs (rankings, star
    ratings of several completions of a prompt, several annotators)."""

    DENSE_MAX_C = 1024         # A^T W A as a dense C x C matrix up to here (C^2 F), a sparse one above

    def __init__(self, Z: torch.Tensor, ci: torch.Tensor, ri: torch.Tensor):
        self.Z, self.Z32, self.ci, self.ri = Z, Z.float(), ci, ri
        self.C, self.F = Z.shape

    def matvec(self, w: torch.Tensor) -> torch.Tensor:
        s = self.Z @ w
        return s[self.ci] - s[self.ri]

    def rmatvec(self, v: torch.Tensor) -> torch.Tensor:
        a = torch.zeros(self.C, dtype=v.dtype)
        a.index_add_(0, self.ci, v)
        a.index_add_(0, self.ri, -v)
        return self.Z.T @ a

    def gram(self, W: torch.Tensor) -> torch.Tensor:
        W = W.float()
        rows = torch.cat([self.ci, self.ri, self.ci, self.ri])
        cols = torch.cat([self.ci, self.ri, self.ri, self.ci])
        vals = torch.cat([W, W, -W, -W])
        if self.C <= self.DENSE_MAX_C:
            M = torch.zeros(self.C, self.C, dtype=torch.float32)
            M.index_put_((rows, cols), vals, accumulate=True)
            MZ = M @ self.Z32
        else:
            M = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (self.C, self.C),
                                        check_invariants=False).coalesce()
            MZ = torch.sparse.mm(M, self.Z32)
        return (self.Z32.T @ MZ).double()


def _primal_fit(D, m: torch.Tensor, lam: float, w: torch.Tensor | None = None,
                max_iter: int = 50, tol: float = 1e-12, counts: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton in the primal, re-using a Hessian factor while it keeps making fast progress.

    D: the pair-difference rows, a [n, F] tensor or a design (_DenseDesign / _IndexedDesign). counts: [n] weight
    of each pair (identical pairs merged into one row), None for all 1. Returns (w, Cholesky factor of the
    Hessian at w)."""
    design = _DenseDesign(D) if isinstance(D, torch.Tensor) else D
    F = design.F
    if w is None:
        w = torch.zeros(F, dtype=_F64)
    eye = torch.eye(F, dtype=_F64)

    def state(w):
        f = design.matvec(w)
        loss = _softplus(m - f)
        obj = (loss if counts is None else counts * loss).sum() + 0.5 * lam * (w @ w)
        return f, obj

    def hessian_factor(f):
        p = torch.sigmoid(f - m)
        W = p * (1 - p)
        H = design.gram(W if counts is None else counts * W) + lam * eye
        return torch.linalg.cholesky(H)

    f, obj = state(w)
    L = hessian_factor(f)
    fresh = True
    prev_decrement = math.inf
    for _ in range(max_iter):
        p = torch.sigmoid(f - m)
        g = -design.rmatvec((1 - p) if counts is None else counts * (1 - p)) + lam * w
        step = -torch.cholesky_solve(g[:, None], L)[:, 0]
        decrement = float(-(g @ step))
        if decrement / 2 <= tol * (1.0 + abs(float(obj))):
            if fresh:
                break
            L, fresh = hessian_factor(f), True       # confirm convergence with the exact Hessian
            continue
        if not fresh and decrement > 0.1 * prev_decrement:
            L, fresh = hessian_factor(f), True       # a stale factor converging slowly: refresh it
            continue
        prev_decrement = decrement
        t = 1.0
        while True:
            w_new = w + t * step
            f_new, obj_new = state(w_new)
            if obj_new <= obj + 1e-12 * abs(float(obj)) or t < 1e-4:
                break
            t *= 0.5
        progress = float(obj - obj_new)
        w, f, obj = w_new, f_new, obj_new
        if t < 1.0 or progress < 0.25 * decrement:
            L, fresh = hessian_factor(f), True
        else:
            fresh = False            # next step re-uses this factor (a chord step: one matvec pair, no F^3)
    if not fresh:
        L = hessian_factor(f)
    return w, L


class FastRewardModel:
    """Linear Bradley-Terry reward head on standardised features, with a Laplace posterior."""

    def __init__(self):
        self.weight: np.ndarray | None = None     # [F] float64, on standardised features
        self.bias: float = 0.0
        self.mean: np.ndarray | None = None       # [F] standardisation
        self.std: np.ndarray | None = None
        self.cov: np.ndarray | None = None        # [F, F] float32 Laplace posterior covariance of weight
        self.l2: float | None = None
        self.l2_scale: float | None = None        # mean |d|^2 of the training pairs (l2 = c * l2_scale)
        self.n_pairs: int = 0
        self.cv: dict | None = None               # {"c": [...], "l2": [...], "loss": [...], "n": int} or None
        self.fit_seconds: float = 0.0

    # ------------------------------------------------------------------ fitting
    @property
    def fitted(self) -> bool:
        return self.weight is not None

    @property
    def n_features(self) -> int:
        if self.weight is None:
            raise RuntimeError("the fast reward model is not fitted yet")
        return int(self.weight.shape[0])

    def fit(self, X_chosen, X_rejected, margin=None, l2: float | None = None, X_ref=None,
            seed: int = 0) -> "FastRewardModel":
        """Fit on n labelled pairs (rows of X_chosen beat the same rows of X_rejected).

        margin: [n] or None. l2: penalty (absolute, on the summed loss); None chooses it by k-fold CV.
        X_ref: rows for the standardisation (default: the training rows; pass the features of all known
        completions to standardise on more data than the labelled pairs). Returns self.
        """
        t0 = time.perf_counter()
        Xc, Xr = _as_tensor(X_chosen, "X_chosen"), _as_tensor(X_rejected, "X_rejected")
        if Xc.shape != Xr.shape:
            raise ValueError(f"X_chosen {tuple(Xc.shape)} and X_rejected {tuple(Xr.shape)} differ in shape")
        n, F = Xc.shape
        if n == 0:
            raise ValueError("no pairs to fit on")
        m = np.zeros(n) if margin is None else np.asarray(margin, dtype=np.float64).reshape(-1)
        if m.shape != (n,) or not np.isfinite(m).all():
            raise ValueError(f"margin must be {n} finite numbers")
        if X_ref is None:
            nr = 2 * n
            s1 = Xc.sum(0, dtype=_F64) + Xr.sum(0, dtype=_F64)
            s2 = (Xc.double() ** 2).sum(0) + (Xr.double() ** 2).sum(0)
        else:
            nr, s1, s2 = _ref_moments(X_ref, F)
        mean, std_t = _mean_std(nr, s1, s2)
        mean, std = mean.numpy(), std_t.numpy()

        D = (Xc.double() - Xr.double()) / std_t                  # the mean cancels in the difference
        mt = torch.from_numpy(m)
        scale = float((D * D).sum(1).mean()) or 1.0
        with _one_thread():
            l2, cv, w0 = _regularisation(l2, n, scale, lambda: self._cross_validate(D, mt, scale, seed))
            if n <= DUAL_MAX_FRACTION * F:
                K = D @ D.T
                alpha = _dual_fit(K, mt, l2)
                w = D.T @ alpha
                f = K @ alpha
                p = torch.sigmoid(f - mt)
                sw = torch.sqrt(p * (1 - p))
                L = torch.linalg.cholesky(sw[:, None] * K * sw[None, :] + l2 * torch.eye(n, dtype=_F64))
                B = torch.linalg.solve_triangular(L, sw[:, None] * D, upper=False)      # [n, F]
                cov = (torch.eye(F, dtype=_F64) - B.T @ B) / l2
        if n > DUAL_MAX_FRACTION * F:
            if self.weight is not None and self.weight.shape == (F,):
                w0 = torch.from_numpy(self.weight.copy())      # warm start from the previous fit (refits)
            w, L = _primal_fit(D, mt, l2, w0)
            cov = torch.cholesky_inverse(L)
        self.weight = w.numpy().copy()
        self.mean, self.std = mean, std
        self.bias = 0.0      # z is centred on the reference rows, so their mean score is already 0
        self.cov = cov.float().numpy()
        self.l2, self.l2_scale, self.n_pairs, self.cv = l2, scale, n, cv
        self.fit_seconds = time.perf_counter() - t0
        return self

    @staticmethod
    def _cv_subset(n: int, seed: int) -> np.ndarray:
        """The (fixed, seeded) pairs that cross-validation uses: all, shuffled, or CV_MAX_PAIRS of them."""
        rng = np.random.default_rng(seed)
        return rng.permutation(n)[:CV_MAX_PAIRS] if n > CV_MAX_PAIRS else rng.permutation(n)

    @staticmethod
    def _cross_validate(D: torch.Tensor, m: torch.Tensor, scale: float, seed: int
                        ) -> tuple[float, dict, torch.Tensor]:
        idx = torch.from_numpy(FastRewardModel._cv_subset(D.shape[0], seed))
        return FastRewardModel._cross_validate_rows(D[idx], m[idx], scale)

    @staticmethod
    def _cross_validate_rows(Ds: torch.Tensor, ms: torch.Tensor, scale: float) -> tuple[float, dict, torch.Tensor]:
        """k-fold CV over CV_GRID on the subset's difference rows Ds; (c, cv record, warm start for the fit)."""
        K = Ds @ Ds.T
        k = CV_FOLDS
        folds = np.arange(Ds.shape[0]) % k
        losses = np.zeros(len(CV_GRID))
        for j in range(k):
            tr = torch.from_numpy(np.flatnonzero(folds != j))
            va = torch.from_numpy(np.flatnonzero(folds == j))
            Ktr, Kva = K[tr][:, tr], K[va][:, tr]
            alpha = None
            for gi in range(len(CV_GRID) - 1, -1, -1):        # strong to weak penalty, warm-started
                alpha = _dual_fit(Ktr, ms[tr], CV_GRID[gi] * scale, alpha, tol=1e-6)
                losses[gi] += float(_softplus(ms[va] - Kva @ alpha).sum())
        losses /= Ds.shape[0]
        best = int(np.argmin(losses))
        # The subset's solution at the chosen penalty: a warm start for a primal fit on all pairs.
        alpha = _dual_fit(K, ms, CV_GRID[best] * scale, tol=1e-6)
        w0 = Ds.T @ alpha
        cv = {"c": list(CV_GRID), "l2": [c * scale for c in CV_GRID], "loss": losses.tolist(),
              "n": int(Ds.shape[0]), "folds": k}
        return CV_GRID[best], cv, w0

    # ------------------------------------------------------------------ incremental fitting
    def fit_indexed(self, X, chosen, rejected, margin=None, l2: float | None = None, X_ref=None, seed: int = 0,
                    warm_start: "FastRewardModel | None" = None) -> "FastRewardModel":
        """The fit of `fit(X[chosen], X[rejected], margin, l2, X_ref, seed)`, with the pairs given as row indices
        into X [C, F], the feature rows of the distinct completions. Made for refits after every label:

        - identical pairs (same chosen, rejected and margin: the same comparison by several annotators, or
          repeated by the pair compiler) become one loss term weighted by their count: the same objective;
        - when fewer completions than distinct pairs take part, Newton works in completion space
          (D^T W D = Z^T (A^T W A) Z: C F^2 instead of n F^2 per Hessian; `_IndexedDesign`);
        - warm_start: a previous fit (any standardisation, the same features) whose weights, re-expressed on
          this fit's standardisation, start Newton; a few steps instead of ~10. The objective is strictly convex
          and Newton stops at the same relative tolerance, so the answer does not depend on the start.

        With few pairs (the dual regime) it simply calls `fit` on the gathered rows. Returns self."""
        t0 = time.perf_counter()
        Xt = _as_tensor(X, "X")
        C, F = Xt.shape
        ci = np.asarray(chosen, dtype=np.int64).reshape(-1)
        ri = np.asarray(rejected, dtype=np.int64).reshape(-1)
        n = ci.shape[0]
        if ri.shape != (n,):
            raise ValueError(f"chosen ({n}) and rejected ({ri.shape[0]}) differ in length")
        if n == 0:
            raise ValueError("no pairs to fit on")
        if min(ci.min(), ri.min()) < 0 or max(ci.max(), ri.max()) >= C:
            raise ValueError(f"pair indices must lie in 0..{C - 1}")
        m = np.zeros(n) if margin is None else np.asarray(margin, dtype=np.float64).reshape(-1)
        if m.shape != (n,) or not np.isfinite(m).all():
            raise ValueError(f"margin must be {n} finite numbers")
        if n <= DUAL_MAX_FRACTION * F:
            self.weight = None            # the dual path starts from zero anyway
            return self.fit(Xt[torch.from_numpy(ci)], Xt[torch.from_numpy(ri)], margin=m, l2=l2, X_ref=X_ref,
                            seed=seed)
        # Only the completions that take part matter (X may hold more rows, e.g. a cache of all completions).
        used, inv = np.unique(np.concatenate([ci, ri]), return_inverse=True)
        ci, ri = inv[:n], inv[n:]
        Xu = Xt[torch.from_numpy(used)].double()
        if X_ref is None:            # the rows of the pairs, each as often as it occurs (as fit stacks them)
            occ = torch.from_numpy(np.bincount(np.concatenate([ci, ri]), minlength=len(used)).astype(np.float64))
            nr, s1, s2 = 2 * n, occ @ Xu, occ @ (Xu * Xu)
        else:
            nr, s1, s2 = _ref_moments(X_ref, F)
        mean, std_t = _mean_std(nr, s1, s2)
        Z = (Xu - mean) / std_t                                       # [C_used, F]
        # Merge identical (chosen, rejected, margin) pairs into one weighted term.
        mvals, mi = np.unique(m, return_inverse=True)
        Cu = len(used)
        key = (ci * Cu + ri) * len(mvals) + mi.reshape(-1)          # < C^2 * n: no int64 overflow in practice
        _, first, counts = np.unique(key, return_index=True, return_counts=True)
        cu, ru = torch.from_numpy(ci[first]), torch.from_numpy(ri[first])
        mu = torch.from_numpy(m[first])
        cnt = torch.from_numpy(counts.astype(np.float64))
        sq = torch.empty(len(first), dtype=_F64)      # |d|^2 of each distinct pair, in chunks (no [n, F] matrix)
        for s0 in range(0, len(first), 4096):
            d = Z[cu[s0:s0 + 4096]] - Z[ru[s0:s0 + 4096]]
            sq[s0:s0 + 4096] = (d * d).sum(1)
        scale = float((cnt * sq).sum() / n) or 1.0
        def cross_validate():
            idx = self._cv_subset(n, seed)
            Ds = Z[torch.from_numpy(ci[idx])] - Z[torch.from_numpy(ri[idx])]
            with _one_thread():
                return self._cross_validate_rows(Ds, torch.from_numpy(m[idx]), scale)

        l2, cv, w0 = _regularisation(l2, n, scale, cross_validate)
        if warm_start is not None and warm_start.weight is not None and warm_start.weight.shape == (F,):
            # r = ((x - mean') / std') @ w' + b': the same function on this standardisation has w = w' * std / std'
            w0 = torch.from_numpy(warm_start.weight * (std_t.numpy() / warm_start.std))
        if len(used) < len(first):
            design = _IndexedDesign(Z, cu, ru)
        else:
            design = _DenseDesign(Z[cu] - Z[ru])
        # One thread: with the cores shared (the app generates, other processes run), multi-threaded LAPACK on
        # F x F matrices stalls at its barriers (measured on 2 busy cores: cholesky_inverse 1.8 s on 2 threads,
        # 0.02 s on 1).
        with _one_thread():
            w, L = _primal_fit(design, mu, l2, w0, counts=cnt)
            cov = torch.cholesky_inverse(L)
        self.weight = w.numpy().copy()
        self.mean, self.std = mean.numpy(), std_t.numpy()
        self.bias = 0.0
        self.cov = cov.float().numpy()
        self.l2, self.l2_scale, self.n_pairs, self.cv = l2, scale, n, cv
        self.fit_seconds = time.perf_counter() - t0
        return self

    # ------------------------------------------------------------------ scoring
    def _z(self, X) -> np.ndarray:
        if self.weight is None:
            raise RuntimeError("the fast reward model is not fitted yet")
        X = _as_2d(X, "X")
        if X.shape[1] != self.weight.shape[0]:
            raise ValueError(f"X has {X.shape[1]} features, the model has {self.weight.shape[0]}")
        return (X - self.mean) / self.std

    def _quad(self, Z: np.ndarray) -> np.ndarray:
        cov = torch.from_numpy(self.cov).double()
        Zt = torch.from_numpy(Z)
        return ((Zt @ cov) * Zt).sum(1).clamp(min=0).numpy()

    def score(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(mean [N], std [N]) of the reward of feature rows X [N, F] under the Laplace posterior."""
        Z = self._z(X)
        return Z @ self.weight + self.bias, np.sqrt(self._quad(Z))

    def prob_chosen(self, Xa, Xb) -> tuple[np.ndarray, np.ndarray]:
        """(P(a beats b) [N], std of r(a) - r(b) [N]); P is moderated by the posterior variance."""
        Za, Zb = self._z(Xa), self._z(Xb)
        d = Za - Zb
        mu = d @ self.weight
        var = self._quad(d)
        p = 1.0 / (1.0 + np.exp(-mu / np.sqrt(1.0 + math.pi * var / 8.0)))
        return p, np.sqrt(var)

    def evaluate(self, X_chosen, X_rejected, margin=None, n_bins: int = 10) -> dict:
        """Held-out metrics: accuracy (ties half), mean BT loss (point estimate, with margin), n, ECE and
        reliability bins (of the moderated probabilities, both sides of each pair)."""
        mc, _ = self.score(X_chosen)
        mr, _ = self.score(X_rejected)
        n = int(mc.shape[0])
        if n == 0:
            return {"accuracy": float("nan"), "loss": float("nan"), "n": 0, "ece": float("nan"), "bins": []}
        m = np.zeros(n) if margin is None else np.asarray(margin, dtype=np.float64).reshape(-1)
        diff = mc - mr
        loss = float(np.logaddexp(0.0, -(diff - m)).mean())
        acc = float(((diff > 0) + 0.5 * (diff == 0)).mean())
        p, _ = self.prob_chosen(X_chosen, X_rejected)
        return {"accuracy": acc, "loss": loss, "n": n, "ece": expected_calibration_error(p, n_bins),
                "bins": [b._asdict() for b in reliability_bins(p, n_bins)]}

    def evaluate_indexed(self, X, chosen, rejected, margin=None, n_bins: int = 10) -> dict:
        """`evaluate(X[chosen], X[rejected], margin, n_bins)` with the pairs as row indices into X [C, F]: scores
        once per completion, and the posterior variance of each distinct pair's score difference from the C x C
        matrix Z S Z^T (when C is small) instead of one F x F quadratic form per pair."""
        ci = np.asarray(chosen, dtype=np.int64).reshape(-1)
        ri = np.asarray(rejected, dtype=np.int64).reshape(-1)
        n = int(ci.shape[0])
        if ri.shape != (n,):
            raise ValueError(f"chosen ({n}) and rejected ({ri.shape[0]}) differ in length")
        if n == 0:
            return {"accuracy": float("nan"), "loss": float("nan"), "n": 0, "ece": float("nan"), "bins": []}
        X = np.asarray(X)
        used, inv = np.unique(np.concatenate([ci, ri]), return_inverse=True)
        ci, ri = inv[:n], inv[n:]
        Z = self._z(X[used])
        s = Z @ self.weight + self.bias
        m = np.zeros(n) if margin is None else np.asarray(margin, dtype=np.float64).reshape(-1)
        diff = s[ci] - s[ri]
        loss = float(np.logaddexp(0.0, -(diff - m)).mean())
        acc = float(((diff > 0) + 0.5 * (diff == 0)).mean())
        _, first, pinv = np.unique(ci * len(used) + ri, return_index=True, return_inverse=True)
        uniq, pinv = np.stack([ci[first], ri[first]], 1), pinv.reshape(-1)
        cov = torch.from_numpy(self.cov).double()
        Zt = torch.from_numpy(Z)
        with _one_thread():
            if len(used) <= _IndexedDesign.DENSE_MAX_C and len(used) < len(uniq):
                G = ((Zt @ cov) @ Zt.T).numpy()
                var_u = G[uniq[:, 0], uniq[:, 0]] + G[uniq[:, 1], uniq[:, 1]] - 2 * G[uniq[:, 0], uniq[:, 1]]
            else:
                var_u = np.concatenate([self._quad(Z[uniq[s0:s0 + 4096, 0]] - Z[uniq[s0:s0 + 4096, 1]])
                                        for s0 in range(0, len(uniq), 4096)])
        var = np.clip(var_u, 0, None)[pinv]
        p = 1.0 / (1.0 + np.exp(-diff / np.sqrt(1.0 + math.pi * var / 8.0)))      # moderated, as prob_chosen
        return {"accuracy": acc, "loss": loss, "n": n, "ece": expected_calibration_error(p, n_bins),
                "bins": [b._asdict() for b in reliability_bins(p, n_bins)]}

    def to_torch_head(self, device=None, dtype=torch.float32):
        """(weight [F], bias [], mean [F], std [F]) tensors: score = ((f - mean) / std) @ weight + bias."""
        if self.weight is None:
            raise RuntimeError("the fast reward model is not fitted yet")
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)  # noqa: E731
        return t(self.weight), t(self.bias), t(self.mean), t(self.std)

    def reward_fn_for_ppo(self, lm=None):
        """The PPO RewardFn of this probe (uses_base_hidden=True); see ppo_reward."""
        from .ppo_reward import FastRewardFn
        return FastRewardFn(self, lock=getattr(lm, "lock", None))

    # ------------------------------------------------------------------ bytes
    def to_bytes(self) -> bytes:
        """safetensors bytes of the fitted model (weights, standardisation, posterior covariance, metadata)."""
        from safetensors.numpy import save
        if self.weight is None:
            raise RuntimeError("the fast reward model is not fitted yet")
        meta = {"format": FORMAT, "version": VERSION,
                "info": json.dumps({"bias": self.bias, "l2": self.l2, "l2_scale": self.l2_scale,
                                    "n_pairs": self.n_pairs, "cv": self.cv, "fit_seconds": self.fit_seconds})}
        return save({"weight": self.weight.astype(np.float64), "mean": self.mean.astype(np.float64),
                     "std": self.std.astype(np.float64), "cov": self.cov.astype(np.float32)}, metadata=meta)

    @classmethod
    def from_bytes(cls, b: bytes) -> "FastRewardModel":
        from safetensors.numpy import load
        try:
            tensors = load(bytes(b))
            meta = safetensors_metadata(bytes(b))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"not a fast reward model: {type(e).__name__}: {e}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a fast reward model (format {meta.get('format')!r})")
        info = json.loads(meta.get("info", "{}"))
        self = cls()
        self.weight, self.mean, self.std = tensors["weight"], tensors["mean"], tensors["std"]
        self.cov = tensors["cov"]
        self.bias = float(info.get("bias", 0.0))
        self.l2, self.l2_scale = info.get("l2"), info.get("l2_scale")
        self.n_pairs, self.cv = int(info.get("n_pairs", 0)), info.get("cv")
        self.fit_seconds = float(info.get("fit_seconds", 0.0))
        return self


def _regularisation(l2, n: int, scale: float, cross_validate) -> tuple[float, dict | None, torch.Tensor | None]:
    """(l2, cross-validation report, its warm start): `l2` as given, else chosen by `cross_validate()` where there
    are enough pairs (DEFAULT_C below that), on the design's scale."""
    cv = w0 = None
    if l2 is None:
        if n >= MIN_CV_PAIRS:
            c, cv, w0 = cross_validate()
        else:
            c = DEFAULT_C
        l2 = c * scale
    l2 = float(l2)
    if not l2 > 0:
        raise ValueError("l2 must be positive")
    return l2, cv, w0
