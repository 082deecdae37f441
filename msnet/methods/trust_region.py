"""Trust-region numerics that RMTR (:mod:`msnet.methods.rmtr`) solves each level's model with: Steihaug's
truncated conjugate gradients inside a ball, and the limited-memory symmetric-rank-one (L-SR1) Hessian
approximation (Nocedal & Wright, *Numerical Optimization*, 2nd ed., Alg. 7.2 and Sec. 6.2/7.3).

Vectors are flat ``(n,)`` tensors of all the parameters (:func:`flat`, :func:`unflat`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import torch

CG_TOL = 1e-6
"""Steihaug-CG stops when the model's residual ||g + B s|| <= CG_TOL ||g||."""

Matvec = Callable[[torch.Tensor], torch.Tensor]


def _to_boundary(s: torch.Tensor, d: torch.Tensor, radius: float) -> torch.Tensor:
    """s + tau d with tau >= 0 and ||s + tau d|| = radius (``||s|| <= radius``)."""
    a, b, c = float(d @ d), 2.0 * float(s @ d), float(s @ s) - radius ** 2
    tau = (-b + math.sqrt(max(b * b - 4.0 * a * c, 0.0))) / (2.0 * a)
    return s + tau * d


def steihaug(g: torch.Tensor, matvec: Matvec, radius: float, max_iter: int,
             tol: float = CG_TOL) -> Tuple[torch.Tensor, bool]:
    """Approximate minimiser of m(s) = <g, s> + 1/2 <s, B s> over ||s|| <= radius (Steihaug-Toint truncated CG;
    Nocedal & Wright 2006, Alg. 7.2). Returns ``(s, on_boundary)``.

    ``g``: the flat gradient ``(n,)``; ``matvec``: v -> B v, B symmetric, possibly indefinite. The first
    iterate is the Cauchy point; negative curvature or leaving the region ends on the boundary.
    """
    s = torch.zeros_like(g)
    r = g.clone()
    g_norm = float(g.norm())
    if g_norm == 0.0:
        return s, False
    d = -r
    for _ in range(max_iter):
        Bd = matvec(d)
        curvature = float(d @ Bd)
        if curvature <= 0.0:
            return _to_boundary(s, d, radius), True
        rr = float(r @ r)
        alpha = rr / curvature
        s_next = s + alpha * d
        if float(s_next.norm()) >= radius:
            return _to_boundary(s, d, radius), True
        s = s_next
        r = r + alpha * Bd
        if float(r.norm()) <= tol * g_norm:
            break
        d = -r + (float(r @ r) / rr) * d
    return s, False


def model_decrease(g: torch.Tensor, s: torch.Tensor, matvec: Matvec) -> float:
    """-m(s) = -<g, s> - 1/2 <s, B s>: the decrease the quadratic model predicts for step s."""
    return -float(g @ s) - 0.5 * float(s @ matvec(s))


class LSR1:
    """Limited-memory SR1 matrix B = gamma I + sum_j c_j r_j r_j^T (see :mod:`msnet.methods.rmtr`), on flat vectors.

    ``memory`` pairs at most; ``skip`` is r in the skip rule |<s, y - B s>| >= r ||s|| ||y - B s||;
    ``gamma0`` the scale before any pair with <s, y> > 0.
    """

    def __init__(self, memory: int, skip: float, gamma0: float):
        self.memory, self.skip, self.gamma = memory, skip, float(gamma0)
        self.S: List[torch.Tensor] = []
        self.Y: List[torch.Tensor] = []
        self.R: List[torch.Tensor] = []
        self.c: List[float] = []

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """B v for a flat ``(n,)`` vector."""
        return self._apply(v, self.gamma, self.R, self.c)

    @staticmethod
    def _apply(v: torch.Tensor, gamma: float, R: List[torch.Tensor], c: List[float]) -> torch.Tensor:
        out = gamma * v
        for r, cj in zip(R, c):
            out = out + (cj * float(r @ v)) * r
        return out

    def _build(self, S: List[torch.Tensor], Y: List[torch.Tensor], gamma: float):
        """The kept pairs and their (r_j, c_j), oldest first, from gamma I; pairs failing the skip rule are dropped."""
        kept_s, kept_y, R, c = [], [], [], []
        for s, y in zip(S, Y):
            r = y - self._apply(s, gamma, R, c)
            rs, bound = float(r @ s), self.skip * float(s.norm()) * float(r.norm())
            if rs != 0.0 and abs(rs) >= bound:
                kept_s.append(s), kept_y.append(y), R.append(r), c.append(1.0 / rs)
        return kept_s, kept_y, R, c

    def update(self, s: torch.Tensor, y: torch.Tensor) -> bool:
        """Add the pair (s, y) if it passes the skip rule against the rebuilt B; returns whether it was kept
        (if not, nothing changes)."""
        if self.memory == 0:
            return False
        sy = float(s @ y)
        gamma = float(y @ y) / sy if sy > self.skip * float(s.norm()) * float(y.norm()) and sy > 0 else self.gamma
        S, Y, R, c = self._build((self.S + [s])[-self.memory:], (self.Y + [y])[-self.memory:], gamma)
        if not S or S[-1] is not s:
            return False
        self.S, self.Y, self.R, self.c, self.gamma = S, Y, R, c, gamma
        return True

    def state_dict(self) -> Dict[str, Any]:
        return {"gamma": self.gamma, "S": [t.clone() for t in self.S], "Y": [t.clone() for t in self.Y],
                "R": [t.clone() for t in self.R], "c": list(self.c)}

    def load_state_dict(self, state: Dict[str, Any], like: torch.Tensor) -> None:
        def to(ts: List[torch.Tensor]) -> List[torch.Tensor]:
            return [t.to(device=like.device, dtype=like.dtype) for t in ts]

        self.gamma, self.c = float(state["gamma"]), [float(x) for x in state["c"]]
        self.S, self.Y, self.R = to(state["S"]), to(state["Y"]), to(state["R"])


def flat(ts: List[torch.Tensor]) -> torch.Tensor:
    """The tensors ``ts`` (detached) as one flat vector."""
    return torch.cat([t.detach().reshape(-1) for t in ts])


def unflat(v: torch.Tensor, like: List[torch.Tensor]) -> List[torch.Tensor]:
    """A flat vector cut into tensors shaped like ``like`` (views of ``v``)."""
    return [c.view_as(p) for c, p in zip(v.split([p.numel() for p in like]), like)]
