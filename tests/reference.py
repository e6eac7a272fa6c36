"""An independent, naive float64 implementation of docs/algorithms.md#projected-step, with the recovery
scaling of docs/algorithms.md#recovery, APOLLO's scaling (docs/algorithms.md#apollo) and LDAdam's error
feedback (docs/algorithms.md#ldadam), for tests.

It forms every matrix explicitly (the residual ``E``, ``D``, the transport's covariance), so it
shares no code path with the optimizer's fused formulas. Bases are supplied from outside (the
rules are tested on their own), so random rules can be checked too.
"""

import math

import torch


class ReferenceStep:
    def __init__(self, w0, rank, lr, betas=(0.9, 0.999), eps=1e-6, wd=0.0, alpha=0.25, alpha_r=None,
                 transport="keep", recovery=False, zeta=1.01, update_interval=200, scaling=None,
                 error_feedback=False):
        self.W = w0.detach().double().clone()
        self.m_, self.n_ = w0.shape
        self.transposed = self.m_ >= self.n_
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, betas[0], betas[1], eps, wd
        self.alpha, self.alpha_r = alpha, alpha if alpha_r is None else alpha_r
        self.transport, self.recovery, self.zeta, self.T = transport, recovery, zeta, update_interval
        self.scaling, self.error_feedback = scaling, error_feedback
        self.E = torch.zeros(min(self.m_, self.n_), max(self.m_, self.n_), dtype=torch.float64)
        self.Q = None
        self.t = 0  # steps taken
        self.count = 0  # bias-correction count
        self.prev_norm = 0.0

    def step(self, G, Q_new):
        X = (G.T if self.transposed else G).double()
        if self.error_feedback:
            X = X + self.E
        Q_new = Q_new.double()
        if self.Q is None:
            self.Q = Q_new
            r, k = Q_new.shape[1], X.shape[1]
            self.M = torch.zeros(r, k, dtype=torch.float64)
            self.V = torch.zeros(r, k, dtype=torch.float64)
        elif self.t % self.T == 0:
            C = Q_new.T @ self.Q
            if self.transport == "rotate":
                var = self.V - self.M**2
                M2 = C @ self.M
                self.V = ((C**2) @ var + M2**2).abs()
                self.M = M2
            elif self.transport == "reset":
                self.M.zero_()
                self.V.zero_()
                self.count = 0
            self.Q = Q_new
        Q = self.Q
        R = Q.T @ X
        self.t += 1
        self.count += 1
        self.M = self.b1 * self.M + (1 - self.b1) * R
        self.V = self.b2 * self.V + (1 - self.b2) * R * R
        N = self.M / (self.V.sqrt() + self.eps)
        D = self.alpha * Q @ N
        if self.scaling is not None:  # APOLLO: the raw gradient scaled, nothing back-projected
            if self.scaling == "channel":
                phi = N.norm(dim=0) / (R.norm(dim=0) + 1e-8)
            else:
                phi = N.norm() / (R.norm() + 1e-8)
            S = X * phi
            s = S.norm().item()
            if self.prev_norm > 0 and s > self.zeta * self.prev_norm:
                S = S * (self.zeta * self.prev_norm / s)
            self.prev_norm = S.norm().item()
            D = self.alpha * S
        if self.error_feedback:
            self.E = X - Q @ R
        if self.recovery:
            E = X - Q @ R
            phi = N.norm(dim=0) / (R.norm(dim=0) + 1e-8)
            S = E * phi[None, :]
            s = S.norm().item()
            if self.prev_norm > 0 and s > self.zeta * self.prev_norm:
                S = S * (self.zeta * self.prev_norm / s)
            self.prev_norm = S.norm().item()
            D = D + self.alpha_r * S
        lr_t = self.lr * math.sqrt(1 - self.b2**self.count) / (1 - self.b1**self.count)
        self.W = self.W - lr_t * (D.T if self.transposed else D)
        self.W = self.W - self.lr * self.wd * self.W
        return self.W
