# lme4 reference fits of generalized linear mixed models (glmer), for issue 17's tests.
#
# Usage: setarch -R Rscript glmer_fixtures.R [OUT_DIR]
#   Writes glmer.json (OUT_DIR defaults to this script's directory): one entry per data set with the data under
#   "data" and lme4's fits under "fits" ({name, formula, family, link, nAGQ, weights, logLik, theta, beta, se,
#   sdcor, ranef}), and one glmer.nb fit (negative_binomial$glmer_nb, with the dispersion nb_theta). Every fit with tight PIRLS (tolPwrss = 1e-12: lme4's default 1e-7 stops its inner iterations
#   early, which biases the log-likelihood low) and BOBYQA with a high evaluation limit.
#   Needs lme4, mlmRev and jsonlite (Debian: r-cran-lme4 r-cran-mlmrev r-cran-jsonlite). About half a minute.
# The formulas here are lme4's; sparsemix's tests fit the same model from the same columns ("ours" gives the
# formula they use where lme4's left-hand side is cbind(), written as a proportion with weights).

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
  library(mlmRev)
})

args <- commandArgs(trailingOnly = TRUE)
file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
source(file.path(dirname(normalizePath(sub("^--file=", "", file_arg))), "exact_json.R"))
out_dir <- if (length(args) >= 1) args[1] else script_dir()

control <- glmerControl(optimizer = "bobyqa", tolPwrss = 1e-12, optCtrl = list(maxfun = 1e5))

fit_record <- function(name, formula, ours, data, family, nAGQ = 1, weights = NULL) {
  m <- if (is.null(weights)) {
    glmer(as.formula(formula), data = data, family = family, nAGQ = nAGQ, control = control)
  } else {
    data$.w <- data[[weights]]
    glmer(as.formula(formula), data = data, family = family, nAGQ = nAGQ, control = control, weights = .w)
  }
  vc <- as.data.frame(VarCorr(m))
  re <- ranef(m)
  list(name = name, formula = formula, ours = ours, family = family$family, link = family$link, nAGQ = nAGQ,
       weights = if (is.null(weights)) NULL else weights,
       logLik = as.numeric(logLik(m)), deviance = deviance(m), theta = I(unname(getME(m, "theta"))),
       beta = as.list(fixef(m)), se = as.list(sqrt(diag(as.matrix(vcov(m))))),
       sdcor = I(vc$sdcor), isSingular = isSingular(m),
       ranef = lapply(re, function(r) c(list(levels = I(rownames(r))), lapply(as.list(r), unname))),
       condsd = lapply(ranef(m, condVar = TRUE), function(r) {
         v <- attr(r, "postVar")
         k <- dim(v)[1]
         sd <- sapply(seq_len(dim(v)[3]), function(l) sqrt(diag(matrix(v[, , l], k, k))))
         lapply(seq_len(k), function(j) if (k == 1) unname(sd) else unname(sd[j, ]))
       }),
       lme4_messages = I(as.character(unlist(m@optinfo$conv$lme4$messages))))
}

cb <- plain(cbpp)
cb$prop <- cb$incidence / cb$size
gt <- plain(grouseticks[, c("TICKS", "YEAR", "HEIGHT", "BROOD", "INDEX", "LOCATION")])
gt$cHEIGHT <- gt$HEIGHT - mean(gt$HEIGHT)
va <- plain(VerbAgg[, c("r2", "Anger", "Gender", "btype", "situ", "id", "item")])
va$y <- as.integer(va$r2 == "Y")
# mlmRev's Contraception: a poorly scaled quadratic in age (its coefficient's standard error 7e-4)
ct <- plain(Contraception[, c("use", "age", "urban", "livch", "district")])
ct$use01 <- as.integer(ct$use == "Y")
ct <- ct[, c("use01", "age", "urban", "livch", "district")]
# a binary response with a correlated random slope (simulated; the seed fixes it)
set.seed(17)
n_g <- 40; per <- 15
g <- rep(seq_len(n_g), each = per); x <- rnorm(n_g * per)
b0 <- rnorm(n_g, sd = 0.8); b1 <- 0.5 * b0 + rnorm(n_g, sd = 0.4)
sl <- data.frame(y = rbinom(n_g * per, 1, plogis(-0.3 + 0.7 * x + b0[g] + b1[g] * x)), x = x, g = as.character(g))
# a binary response with a correlated random slope that is not singular (simulated), for the profile on the sd/cor
# scale
set.seed(173)
n_c <- 60; per_c <- 20
g_c <- rep(seq_len(n_c), each = per_c); x_c <- rnorm(n_c * per_c)
c0 <- rnorm(n_c, sd = 1); c1 <- 0.3 * c0 + rnorm(n_c, sd = 0.6)
co <- data.frame(y = rbinom(n_c * per_c, 1, plogis(-0.2 + 0.8 * x_c + c0[g_c] + c1[g_c] * x_c)), x = x_c,
                 g = as.character(g_c))
# crossed counts with an offset (simulated)
set.seed(171)
s <- rep(seq_len(60), each = 20); it <- sample(rep(seq_len(30), 40)); ex <- runif(1200, 0.5, 2)
cr <- data.frame(count = rpois(1200, ex * exp(0.4 + rnorm(60, sd = 0.5)[s] + rnorm(30, sd = 0.3)[it])),
                 logex = log(ex), subj = as.character(s), item = as.character(it))

# negative binomial counts (simulated), for glmer.nb
set.seed(172)
s_nb <- rep(seq_len(50), each = 12); x_nb <- rnorm(600)
mu_nb <- exp(0.5 + 0.3 * x_nb + rnorm(50, sd = 0.4)[s_nb])
nb <- data.frame(y = rnbinom(600, size = 2.5, mu = mu_nb), x = x_nb, g = as.character(s_nb))
nb_fit <- glmer.nb(y ~ x + (1 | g), nb, control = control)
nb_record <- list(name = "negative_binomial", formula = "y ~ x + (1 | g)", ours = "y ~ x + (1 | g)",
                  family = "negative_binomial", link = "log", nAGQ = 1,
                  logLik = as.numeric(logLik(nb_fit)), nb_theta = getME(nb_fit, "glmer.nb.theta"),
                  theta = I(unname(getME(nb_fit, "theta"))), beta = as.list(fixef(nb_fit)),
                  se = as.list(sqrt(diag(as.matrix(vcov(nb_fit))))), df = attr(logLik(nb_fit), "df"))

sets <- list(
  cbpp = list(dataset = "lme4::cbpp", data = cb, fits = list(
    fit_record("cbpp_laplace", "cbind(incidence, size - incidence) ~ period + (1 | herd)",
               "prop ~ period + (1 | herd)", cb, binomial(), weights = NULL),
    fit_record("cbpp_agq9", "cbind(incidence, size - incidence) ~ period + (1 | herd)",
               "prop ~ period + (1 | herd)", cb, binomial(), nAGQ = 9),
    fit_record("cbpp_nagq0", "cbind(incidence, size - incidence) ~ period + (1 | herd)",
               "prop ~ period + (1 | herd)", cb, binomial(), nAGQ = 0),
    fit_record("cbpp_probit", "cbind(incidence, size - incidence) ~ period + (1 | herd)",
               "prop ~ period + (1 | herd)", cb, binomial(link = "probit")),
    fit_record("cbpp_cloglog", "cbind(incidence, size - incidence) ~ period + (1 | herd)",
               "prop ~ period + (1 | herd)", cb, binomial(link = "cloglog")))),
  grouseticks = list(dataset = "lme4::grouseticks", data = gt, fits = list(
    fit_record("grouseticks", "TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)",
               "TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)", gt, poisson()),
    fit_record("grouseticks_brood_agq5", "TICKS ~ YEAR + cHEIGHT + (1 | BROOD)",
               "TICKS ~ YEAR + cHEIGHT + (1 | BROOD)", gt, poisson(), nAGQ = 5))),
  VerbAgg = list(dataset = "lme4::VerbAgg", data = va[, c("y", "Anger", "Gender", "btype", "situ", "id", "item")],
    fits = list(fit_record("verbagg", "y ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)",
                           "y ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", va, binomial()))),
  Contraception = list(dataset = "mlmRev::Contraception", data = ct, fits = list(
    fit_record("contraception", "use01 ~ age + I(age^2) + urban + livch + (1 | district)",
               "use01 ~ age + I(age^2) + urban + livch + (1 | district)", ct, binomial()))),
  slopes = list(dataset = "simulated binary, (1 + x | g)", data = sl, fits = list(
    fit_record("binary_slopes", "y ~ x + (1 + x | g)", "y ~ x + (1 + x | g)", sl, binomial()))),
  correlated = list(dataset = "simulated binary, (1 + x | g), not singular", data = co, fits = list(
    fit_record("binary_correlated", "y ~ x + (1 + x | g)", "y ~ x + (1 + x | g)", co, binomial()))),
  crossed_counts = list(dataset = "simulated crossed counts with an offset", data = cr, fits = list(
    fit_record("poisson_offset", "count ~ 1 + offset(logex) + (1 | subj) + (1 | item)",
               "count ~ 1 + offset(logex) + (1 | subj) + (1 | item)", cr, poisson())))
)
# profile intervals of cbpp's Laplace fit (lme4's confint(method = "profile"): .sig01 then the fixed effects), and
# of the correlated slopes' (sd, cor, sd, then the fixed effects)
cb_fit <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cb, binomial, control = control)
cb_ci <- suppressWarnings(confint(cb_fit, method = "profile", oldNames = FALSE))
sets$cbpp$profile <- list(names = I(rownames(cb_ci)), lower = I(unname(cb_ci[, 1])), upper = I(unname(cb_ci[, 2])))
co_fit <- glmer(y ~ x + (1 + x | g), co, binomial, control = control)
co_ci <- suppressWarnings(confint(co_fit, method = "profile", oldNames = FALSE))
sets$correlated$profile <- list(names = I(rownames(co_ci)), lower = I(unname(co_ci[, 1])),
                                upper = I(unname(co_ci[, 2])))
sets$negative_binomial <- list(dataset = "simulated negative binomial counts", data = nb, fits = list(),
                               glmer_nb = nb_record)
sets$versions <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")))
write_json(exact_numbers(sets), file.path(out_dir, "glmer.json"), auto_unbox = TRUE, digits = NA,
           na = "null", json_verbatim = TRUE, dataframe = "columns")
