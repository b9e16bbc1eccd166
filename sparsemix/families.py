"""Families for `sparsemix.glmer` (R's family objects): `Binomial(link="logit" | "probit" | "cloglog")` and
`Poisson(link="log")`, `NegativeBinomial(theta)` (theta fixed; `sparsemix.glmer_nb` estimates it); the
implementation is core/families.py."""

from .core.families import Binomial, Family, NegativeBinomial, Poisson

__all__ = ["Binomial", "Poisson", "NegativeBinomial", "Family"]
