"""sparsemix: linear mixed models with crossed and nested random effects, fitted through a sparse Cholesky.

Front doors: a drop-in for statsmodels' MixedLM (`MixedLM`, `MixedLMParams`, `VCSpec`), and lme4's
formula language (`lmer`, `anova`). The engine stages
(`build_system`, `optimize_system`, `build_fit`) and the pipeline that chains them for every door (`fit_system`,
`fit_lmm`) are public for users who want the deviance.
"""

from importlib import metadata as _metadata

from . import families
from .core.threads import blas_libraries
from .errors import (
    ConvergenceWarning,
    DroppedRowsWarning,
    FormulaError,
    IgnoredArgumentWarning,
    InputError,
    MissingDataError,
    NewLevelWarning,
    RankDeficiencyWarning,
    RankDeficientError,
    SingularFitWarning,
    SparsemixError,
    SparsemixWarning,
)
from .fit.pipeline import fit_lmm, fit_system
from .fit.stages import build_fit, build_system, optimize_system
from .inference.anova import anova
from .lme4.glmer import GlmerResults, glmer, glmer_nb
from .lme4.lmer import lmer
from .lme4.many import ManyFits, lmer_many
from .lme4.results import LmerResults
from .statsmodels.model import MixedLM
from .statsmodels.params import MixedLMParams, VCSpec
from .statsmodels.results import MixedLMResults

blas_libraries()  # after every import above (CHOLMOD's BLAS among them): see threads.blas_libraries

try:  # written once, in pyproject.toml
    __version__ = _metadata.version("sparsemix")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "MixedLM",
    "MixedLMParams",
    "MixedLMResults",
    "VCSpec",
    "lmer",
    "lmer_many",
    "ManyFits",
    "glmer",
    "glmer_nb",
    "GlmerResults",
    "families",
    "LmerResults",
    "anova",
    "RankDeficiencyWarning",
    "build_system",
    "optimize_system",
    "build_fit",
    "fit_system",
    "fit_lmm",
    "SparsemixError",
    "InputError",
    "MissingDataError",
    "RankDeficientError",
    "FormulaError",
    "SparsemixWarning",
    "ConvergenceWarning",
    "SingularFitWarning",
    "IgnoredArgumentWarning",
    "NewLevelWarning",
    "DroppedRowsWarning",
    "__version__",
]
