"""Response distributions and links of generalized linear mixed models (R's family objects, as lme4 uses them).

A family gives the link (eta = g(mu), mu = g^{-1}(eta), dmu/deta), the variance function V(mu), the deviance
residuals, and the conditional log-likelihood with its constants (R's `aic()` / -2: log choose(n, k) for the
binomial, -log y! for the Poisson), which lme4's Laplace approximation and its logLik include. `prior_weights` are
lme4's: for the binomial the numbers of trials (the response then a proportion), otherwise case weights.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from ..errors import InputError

__all__ = ["Family", "Binomial", "Poisson", "NegativeBinomial", "family_of"]

_EPS = np.finfo(float).eps
_SQRT_2PI = float(np.sqrt(2 * np.pi))


class Link:
    """A link: name, g, g^{-1} and dmu/deta (mu kept inside the family's range by its own clipping)."""

    def __init__(self, name: str):
        if name not in _LINKS:
            raise InputError(f"link {name!r} is not available; use one of {sorted(_LINKS)}.")
        self.name = name
        self.link, self.inverse, self.mu_eta = _LINKS[name]


def _logit_inverse(eta):
    return special.expit(eta)


def _logit_mu_eta(eta):
    p = special.expit(eta)
    return np.maximum(p * (1 - p), _EPS)


def _probit_mu_eta(eta):
    return np.maximum(np.exp(-0.5 * eta * eta) / _SQRT_2PI, _EPS)


def _cloglog_inverse(eta):
    return np.clip(-np.expm1(-np.exp(eta)), _EPS, 1 - _EPS)


def _cloglog_mu_eta(eta):
    eta = np.minimum(eta, 700.0)
    return np.maximum(np.exp(eta) * np.exp(-np.exp(eta)), _EPS)


def _log_inverse(eta):
    return np.maximum(np.exp(eta), _EPS)


def _log_mu_eta(eta):
    return np.maximum(np.exp(eta), _EPS)


_LINKS = {
    "logit": (special.logit, _logit_inverse, _logit_mu_eta),
    "probit": (special.ndtri, lambda eta: np.clip(special.ndtr(eta), _EPS, 1 - _EPS), _probit_mu_eta),
    "cloglog": (lambda mu: np.log(-np.log1p(-mu)), _cloglog_inverse, _cloglog_mu_eta),
    "log": (np.log, _log_inverse, _log_mu_eta),
}


class Family:
    """A response distribution with a link. Subclasses give variance, deviance residuals, log-likelihood, the
    check of a response, and the start of mu (R's `mustart`)."""

    name = ""
    links: tuple[str, ...] = ()
    default_link = ""

    def __init__(self, link: str | None = None):
        link = self.default_link if link is None else link
        if link not in self.links:
            raise InputError(
                f"the {self.name} family takes the link {' / '.join(repr(x) for x in self.links)}; got {link!r}."
            )
        self.link = Link(link)

    def __repr__(self):
        return f"{type(self).__name__}(link={self.link.name!r})"

    def __eq__(self, other):
        return type(self) is type(other) and self.link.name == other.link.name

    def __hash__(self):
        return hash((type(self).__name__, self.link.name))

    def variance(self, mu):
        raise NotImplementedError

    def variance_slope(self, mu):
        """dV/dmu, where the family gives it (the Laplace objective's exact gradient, core/glmm.py); None otherwise."""
        return None

    def dev_resid(self, y, mu, prior_weights):
        raise NotImplementedError

    def loglik(self, y, mu, prior_weights) -> float:
        """The conditional log-likelihood, R's -aic()/2 (its constant, then the kernel in mu)."""
        return self.loglik_constant(y, prior_weights) + self.kernel(y, mu, prior_weights)

    def check_response(self, y, prior_weights) -> None:
        raise NotImplementedError

    def kernel(self, y, mu, prior_weights) -> float:
        """The log-likelihood less its constant in mu (loglik = loglik_constant + kernel): what PIRLS's penalized
        deviance and the Laplace objective change by, at a fraction of loglik's cost."""
        return self.kernel_of(self.kernel_terms(y, prior_weights), mu)

    def kernel_terms(self, y, prior_weights):
        """What kernel_of needs of the response, computed once per fit."""
        raise NotImplementedError

    def kernel_of(self, terms, mu) -> float:
        raise NotImplementedError

    def row_kernel(self, terms, mu) -> np.ndarray:
        """kernel_of's terms row by row."""
        raise NotImplementedError

    def saturated_kernel(self, terms, y) -> float:
        """The kernel at mu = y (the saturated model: deviance residuals are 2 (this - the kernel) row by row)."""
        return float(np.sum(self.row_kernel(terms, y)))

    def loglik_constant(self, y, prior_weights) -> float:
        raise NotImplementedError

    def mu_and_dmu(self, eta):
        """(mu, dmu/deta) at eta: the logit link shares the work."""
        if self.link.name == "logit":
            with np.errstate(over="ignore"):
                mu = 1.0 / (1.0 + np.exp(-eta))  # numpy's exp: a third of scipy's expit's time
            return mu, np.maximum(mu * (1 - mu), _EPS)
        return self.link.inverse(eta), self.link.mu_eta(eta)

    def mu_start(self, y, prior_weights):
        raise NotImplementedError

    def draw(self, rng, mu, prior_weights) -> np.ndarray:
        """Responses drawn from the family at mu (simulate)."""
        raise NotImplementedError

    @property
    def canonical(self) -> bool:
        """Whether the link is the family's canonical one: PIRLS's steps (with the expected weights) are then
        Newton's, and converge quadratically; with another link, Fisher scoring's, linearly."""
        return self.link.name == self.default_link

    def linkinv(self, eta):
        return self.link.inverse(eta)

    def mu_eta(self, eta):
        return self.link.mu_eta(eta)

    def linkfun(self, mu):
        return self.link.link(mu)


class Binomial(Family):
    """Binomial: the response a proportion of `prior_weights` trials (0/1 with weights 1)."""

    name = "binomial"
    links = ("logit", "probit", "cloglog")
    default_link = "logit"

    def variance(self, mu):
        return np.maximum(mu * (1 - mu), _EPS)

    def variance_slope(self, mu):
        return 1.0 - 2.0 * mu

    def dev_resid(self, y, mu, prior_weights):
        """2 w (y log(y/mu) + (1-y) log((1-y)/(1-mu)))."""
        return 2 * prior_weights * (special.xlogy(y, y / mu) + special.xlogy(1 - y, (1 - y) / (1 - mu)))

    def loglik_constant(self, y, prior_weights):
        """log choose(round(w), round(w y)) summed: loglik is then log dbinom(round(w y); round(w), mu), as R's
        binomial()$aic counts it."""
        n, k = np.round(prior_weights), np.round(prior_weights * y)
        return float(np.sum(special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)))

    def kernel_terms(self, y, prior_weights):
        k = np.round(prior_weights * y)
        return k, np.round(prior_weights) - k  # successes, failures

    def kernel_of(self, terms, mu):
        successes, failures = terms
        mu = np.clip(mu, _EPS, 1 - _EPS)
        return float(successes @ np.log(mu) + failures @ np.log1p(-mu))

    def row_kernel(self, terms, mu):
        successes, failures = terms
        return special.xlogy(successes, mu) + special.xlog1py(failures, -mu)

    def check_response(self, y, prior_weights):
        if np.any((y < 0) | (y > 1)):
            bad = np.flatnonzero((y < 0) | (y > 1))
            raise InputError(
                f"a binomial response must lie in [0, 1] (0/1 outcomes, or proportions with weights= the trials); "
                f"rows {bad[:5].tolist()} have {y[bad[:5]].tolist()}."
            )
        k = prior_weights * y
        if np.any(np.abs(k - np.round(k)) > 1e-7 * np.maximum(1.0, prior_weights)):
            import warnings

            from ..errors import SparsemixWarning

            warnings.warn(
                "non-integer numbers of successes in a binomial fit (response x weights); as R does, the "
                "log-likelihood rounds them.",
                SparsemixWarning,
                stacklevel=4,
            )

    def mu_start(self, y, prior_weights):
        return (prior_weights * y + 0.5) / (prior_weights + 1)

    def draw(self, rng, mu, prior_weights):
        """Responses drawn at mu: proportions of round(prior weights) trials (0/1 with weights 1)."""
        n = np.maximum(np.round(prior_weights), 1).astype(np.int64)
        return rng.binomial(n, mu) / n


class Poisson(Family):
    """Poisson counts."""

    name = "poisson"
    links = ("log",)
    default_link = "log"

    def variance(self, mu):
        return mu

    def variance_slope(self, mu):
        return np.ones_like(mu)

    def dev_resid(self, y, mu, prior_weights):
        return 2 * prior_weights * (special.xlogy(y, y / mu) - (y - mu))

    def loglik_constant(self, y, prior_weights):
        return float(-np.sum(prior_weights * special.gammaln(y + 1)))

    def kernel_terms(self, y, prior_weights):
        return prior_weights * y, prior_weights

    def kernel_of(self, terms, mu):
        counts, weights = terms
        return float(counts @ np.log(np.maximum(mu, _EPS)) - weights @ mu)

    def row_kernel(self, terms, mu):
        counts, weights = terms
        return special.xlogy(counts, mu) - weights * mu

    def check_response(self, y, prior_weights):
        if np.any(y < 0):
            bad = np.flatnonzero(y < 0)
            raise InputError(f"a Poisson response counts events: rows {bad[:5].tolist()} are negative.")
        if np.any(y != np.round(y)):
            import warnings

            from ..errors import SparsemixWarning

            warnings.warn(
                "non-integer counts in a Poisson fit; as R does, the fit goes on (the log-likelihood uses "
                "lgamma(y + 1)).",
                SparsemixWarning,
                stacklevel=4,
            )

    def mu_start(self, y, prior_weights):
        return y + 0.1

    def draw(self, rng, mu, prior_weights):
        return rng.poisson(mu).astype(float)


class NegativeBinomial(Family):
    """Negative binomial counts with dispersion theta (R's MASS::negative.binomial(theta)): variance mu + mu^2 /
    theta. glmer_nb estimates theta; a family object with theta given fixes it."""

    name = "negative_binomial"
    links = ("log",)
    default_link = "log"

    def __init__(self, theta: float, link: str | None = None):
        if not (isinstance(theta, (int, float, np.floating)) and np.isfinite(theta) and theta > 0):
            raise InputError(f"the negative binomial's theta must be a positive number; got {theta!r}.")
        super().__init__(link)
        self.theta = float(theta)

    def __repr__(self):
        return f"NegativeBinomial(theta={self.theta:.6g})"

    def __eq__(self, other):
        return isinstance(other, NegativeBinomial) and self.theta == other.theta

    def __hash__(self):
        return hash(("NegativeBinomial", self.theta))

    @property
    def canonical(self) -> bool:
        return False  # the log link is not the negative binomial's canonical link: PIRLS is Fisher scoring

    def variance(self, mu):
        return mu + mu**2 / self.theta

    def dev_resid(self, y, mu, prior_weights):
        t = self.theta
        return 2 * prior_weights * (special.xlogy(y, y / mu) - (y + t) * np.log((y + t) / (mu + t)))

    def loglik_constant(self, y, prior_weights):
        t = self.theta
        terms = special.gammaln(y + t) - special.gammaln(t) - special.gammaln(y + 1) + t * np.log(t)
        return float(np.sum(prior_weights * terms))

    def kernel_terms(self, y, prior_weights):
        return prior_weights * y, prior_weights * (y + self.theta)

    def kernel_of(self, terms, mu):
        counts, totals = terms
        return float(counts @ np.log(np.maximum(mu, _EPS)) - totals @ np.log(mu + self.theta))

    def row_kernel(self, terms, mu):
        counts, totals = terms
        return special.xlogy(counts, mu) - totals * np.log(mu + self.theta)

    def check_response(self, y, prior_weights):
        Poisson.check_response(self, y, prior_weights)

    def mu_start(self, y, prior_weights):
        return y + (y == 0) / 6.0  # R's negative.binomial()$initialize

    def draw(self, rng, mu, prior_weights):
        return rng.negative_binomial(self.theta, self.theta / (self.theta + mu)).astype(float)


_FAMILIES = {"binomial": Binomial, "poisson": Poisson}


def family_of(family, link: str | None = None) -> Family:
    """A Family from a name ("binomial", "poisson") or a Family object."""
    if isinstance(family, Family):
        return family
    if isinstance(family, str) and family.lower() in _FAMILIES:
        return _FAMILIES[family.lower()](link)
    raise InputError(
        f"family={family!r} is not available: use 'binomial' or 'poisson', or sparsemix.families.Binomial(link=...)"
        " / Poisson()."
    )
