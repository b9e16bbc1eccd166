"""Families for `sparsemix.glmer` (R's family objects): `Binomial(link="logit" | "probit" | "cloglog")` and
`Poisson(link="log")`; the implementation is core/families.py."""

from .core.families import Binomial, Family, Poisson

__all__ = ["Binomial", "Poisson", "Family"]
