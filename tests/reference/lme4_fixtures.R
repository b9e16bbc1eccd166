# Reference fixtures from lme4 for sparsemix's tests.
#
# Usage: Rscript lme4_fixtures.R DATA_DIR [OUT_DIR]
#   DATA_DIR holds nested.csv and crossed.csv written by export_data.py.
#   OUT_DIR defaults to the directory containing this script.
# Writes one JSON file per data set (fields: see README.md). Apart from fit_seconds the output is
# reproducible up to lme4's own address-dependent rounding (~1e-8 in theta); run under `setarch -R` for
# bit-identical reruns. Takes about a minute, mostly profile confidence intervals (skipped for the seed
# data sets; each profile is stopped after PROFILE_TIME_LIMIT seconds).

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 1) stop("usage: Rscript lme4_fixtures.R DATA_DIR [OUT_DIR]")
data_dir <- args[1]
file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
source(file.path(dirname(normalizePath(sub("^--file=", "", file_arg))), "exact_json.R"))   # num_str, exact_numbers
out_dir <- if (length(args) >= 2) args[2] else script_dir()

JSON_NULL <- structure("null", class = "json")

# Profile confidence intervals are the slow part; each profile() call is stopped after this many seconds
# (recorded as a failure). No fit of the current fixtures comes close.
PROFILE_TIME_LIMIT <- 300

# lme4::lmer (or lmerTest::lmer via `fun`) on `data`; `weights` / `offset` are column names of `data`.
# The call is built so that the stored call reads e.g. `lme4::lmer(formula = formula, data = data,
# REML = reml, weights = w, offset = off)`, which update(), profile() and lmerTest can re-evaluate.
fit_lmer <- function(formula, data, reml, weights = NULL, offset = NULL, fun = quote(lme4::lmer)) {
  if (is.null(weights) && is.null(offset) && identical(fun, quote(lme4::lmer)))
    return(lme4::lmer(formula, data = data, REML = reml))
  cl <- as.call(c(list(fun, formula = quote(formula), data = quote(data), REML = quote(reml)),
                  if (!is.null(weights)) list(weights = as.name(weights)),
                  if (!is.null(offset)) list(offset = as.name(offset))))
  eval(cl)
}

# Conditional SDs (levels x columns) from the "postVar" attribute: either one k x k x n array,
# or (several terms for one factor, e.g. `||`) a list of such arrays, one per term.
cond_sd <- function(pv) {
  blocks <- if (is.list(pv)) pv else list(pv)
  do.call(cbind, lapply(blocks, function(a) t(matrix(sqrt(apply(a, 3, diag)), nrow = dim(a)[1]))))
}

ranef_list <- function(m) {
  re <- ranef(m, condVar = TRUE)
  lapply(re, function(df) list(
    levels = I(rownames(df)),
    columns = I(colnames(df)),
    values = unname(as.matrix(df)),
    condsd = unname(cond_sd(attr(df, "postVar")))
  ))
}

# lmerTest::lmer refit of the same call; its summary()$coefficients (Satterthwaite df).
lmertest_coefs <- function(formula, data, reml, weights, offset) {
  mt <- fit_lmer(formula, data, reml, weights, offset, fun = quote(lmerTest::lmer))
  summary(mt)$coefficients
}

# A confint() matrix -> rows {name, lower, upper} (NA -> null).
ci_rows <- function(ci) lapply(seq_len(nrow(ci)), function(i)
  list(name = rownames(ci)[i], lower = unname(ci[i, 1]), upper = unname(ci[i, 2])))

# confint(method = "profile") with lme4's names and once more with oldNames = FALSE (for the names).
# Any warning or error (or the time limit) -> list(error = message).
profile_ci <- function(m) {
  tryCatch({
    setTimeLimit(elapsed = PROFILE_TIME_LIMIT, transient = TRUE)
    on.exit(setTimeLimit(elapsed = Inf))
    old <- confint(m, method = "profile", quiet = TRUE)
    new <- confint(m, method = "profile", oldNames = FALSE, quiet = TRUE)
    stopifnot(nrow(old) == nrow(new))
    diff <- max(abs(unname(old) - unname(new)))
    if (!(diff <= 1e-6)) stop("the two profile calls disagree by ", diff)
    list(ci = old, new_names = rownames(new))
  }, warning = function(w) list(error = paste("warning:", conditionMessage(w))),
     error = function(e) list(error = paste("error:", conditionMessage(e))))
}

# One fitted model -> list(record = what is stored under "fits", model = the lme4 fit).
fit_record <- function(spec, data, with_ranef, with_profile) {
  name <- spec$name; reml <- spec$reml; weights <- spec$weights; offset <- spec$offset
  formula <- as.formula(spec$formula)
  m <- fit_lmer(formula, data, reml, weights, offset)
  rec <- list(
    name = name,
    formula = paste(deparse(formula, width.cutoff = 500L), collapse = " "),
    reml = reml
  )
  if (!is.null(weights)) rec$weights <- weights
  if (!is.null(offset)) rec$offset <- offset
  rec <- c(rec, estimate_fields(m, reml))
  if (with_ranef) rec$ranef <- ranef_list(m)
  rec$isSingular <- isSingular(m)
  rec$optimizer_feval <- m@optinfo$feval
  rec$fit_seconds <- round(median(replicate(3, system.time(
    fit_lmer(formula, data, reml, weights, offset))[["elapsed"]])), 3)
  coefs <- tryCatch(lmertest_coefs(formula, data, reml, weights, offset),
                    error = function(e) conditionMessage(e))
  if (is.character(coefs)) {
    rec$satterthwaite_df <- JSON_NULL
    rec$lmerTest <- JSON_NULL
    rec$lmerTest_error <- coefs
  } else {
    rec$satterthwaite_df <- as.list(setNames(coefs[, "df"], rownames(coefs)))
    rec$lmerTest <- lapply(seq_len(nrow(coefs)), function(i) list(
      name = rownames(coefs)[i], estimate = coefs[i, "Estimate"], std_error = coefs[i, "Std. Error"],
      df = coefs[i, "df"], t = coefs[i, "t value"], p = coefs[i, "Pr(>|t|)"]))
  }

  # What lme4's summary shows: REML criterion for REML fits; AIC, BIC, logLik, deviance, df.resid for ML.
  rec$AIC <- AIC(m)
  rec$BIC <- BIC(m)
  if (reml) {
    rec$REMLcrit <- REMLcrit(m)
  } else {
    rec$deviance <- deviance(m)
    rec$df_resid <- df.residual(m)
  }
  rec$confint_wald <- ci_rows(confint(m, method = "Wald"))
  wald_new_names <- rownames(confint(m, method = "Wald", oldNames = FALSE))
  if (with_profile) {
    pr <- profile_ci(m)
    if (is.null(pr$error)) {
      rec$confint_profile <- ci_rows(pr$ci)
      new_names <- pr$new_names
    } else {
      rec$confint_profile <- JSON_NULL
      rec$confint_profile_error <- pr$error
      message("profile failed for ", name, ": ", pr$error)
      new_names <- wald_new_names
    }
  } else {
    rec$confint_profile <- JSON_NULL
    rec$confint_profile_skipped <- "not computed for this data set (time)"
    new_names <- wald_new_names
  }
  old_names <- rownames(confint(m, method = "Wald"))
  stopifnot(identical(new_names, wald_new_names))
  rec$profile_param_names <- lapply(seq_along(old_names), function(i)
    list(name = old_names[i], param = new_names[i]))
  rec$summary_text <- I(capture.output(print(summary(m), correlation = FALSE)))
  list(record = rec, model = m)
}

# A fit() spec -> the lme4 fit only (models used only in anova()).
fit_record_model <- function(spec, data) {
  formula <- as.formula(spec$formula)
  fit_lmer(formula, data, spec$reml, spec$weights, spec$offset)
}

# anova() of two models; lme4 refits REML fits with ML (recorded as "refit").
# spec: list(models = two names, extra = fit() specs of models that are not fits of the file).
anova_record <- function(spec, fits, models, data) {
  for (f in spec$extra) models[[f$name]] <- fit_record_model(f, data)
  formulas <- setNames(vapply(c(fits, spec$extra), `[[`, "", "formula"),
                       vapply(c(fits, spec$extra), `[[`, "", "name"))
  a <- anova(models[[spec$models[1]]], models[[spec$models[2]]], model.names = spec$models)
  refit <- any(vapply(models[spec$models], isREML, TRUE))
  cell <- function(col, i) if (col %in% names(a)) a[[col]][i] else NA_real_
  list(
    models = lapply(spec$models, function(n) list(
      name = n, formula = paste(deparse(as.formula(formulas[[n]]), width.cutoff = 500L), collapse = " "),
      reml = isREML(models[[n]]))),
    refit = refit,
    rows = lapply(seq_len(nrow(a)), function(i) list(
      model = rownames(a)[i], npar = cell("npar", i), AIC = cell("AIC", i), BIC = cell("BIC", i),
      logLik = cell("logLik", i), deviance = cell("deviance", i), Chisq = cell("Chisq", i),
      Df = cell("Df", i), p = cell("Pr(>Chisq)", i)))
  )
}

# fits: list of fit() specs; data (and ranef) are embedded for lme4's own (small) data sets.
write_fixture <- function(dataset, data, fits, embed_data, profile = TRUE, anovas = list()) {
  out <- list(
    dataset = dataset,
    lme4_version = as.character(packageVersion("lme4")),
    lmerTest_version = as.character(packageVersion("lmerTest")),
    R_version = R.version.string
  )
  if (embed_data) out$data <- lapply(data, function(col) if (is.factor(col)) as.character(col) else col)
  results <- lapply(fits, function(f) fit_record(f, data, with_ranef = embed_data, with_profile = profile))
  out$fits <- lapply(results, `[[`, "record")
  models <- setNames(lapply(results, `[[`, "model"), vapply(fits, `[[`, "", "name"))
  if (length(anovas)) out$anova <- lapply(anovas, anova_record, fits = fits, models = models, data = data)
  path <- file.path(out_dir, paste0(dataset, ".json"))
  write_json(exact_numbers(out), path, auto_unbox = TRUE, digits = NA, na = "null", json_verbatim = TRUE,
             pretty = TRUE)
  message("wrote ", path)
}

fit <- function(name, formula, reml, weights = NULL, offset = NULL)
  list(name = name, formula = formula, reml = reml, weights = weights, offset = offset)

read_seed <- function(file) {
  d <- read.csv(file.path(data_dir, file), colClasses = c("numeric", "integer", "integer"))
  d$group1 <- factor(d$group1)
  d$group2 <- factor(d$group2)
  d
}

started <- proc.time()[["elapsed"]]

write_fixture("seed_nested", read_seed("nested.csv"), list(
  fit("reml", "y ~ 1 + (1 | group1) + (1 | group1:group2)", TRUE),
  fit("ml", "y ~ 1 + (1 | group1) + (1 | group1:group2)", FALSE)
), embed_data = FALSE, profile = FALSE)

write_fixture("seed_crossed", read_seed("crossed.csv"), list(
  fit("reml", "y ~ 1 + (1 | group1) + (1 | group2)", TRUE),
  fit("ml", "y ~ 1 + (1 | group1) + (1 | group2)", FALSE)
), embed_data = FALSE, profile = FALSE)

sleepstudy <- lme4::sleepstudy[c("Reaction", "Days", "Subject")]
sleepstudy$w <- 1 + (sleepstudy$Days %% 3) / 2
sleepstudy$off <- 0.5 * sleepstudy$Days
write_fixture("sleepstudy", sleepstudy, list(
  fit("reml_corr", "Reaction ~ Days + (Days | Subject)", TRUE),
  fit("ml_corr", "Reaction ~ Days + (Days | Subject)", FALSE),
  fit("reml_uncorr", "Reaction ~ Days + (Days || Subject)", TRUE),
  fit("ml_uncorr", "Reaction ~ Days + (Days || Subject)", FALSE),
  fit("reml_weights_offset", "Reaction ~ Days + (Days | Subject)", TRUE, weights = "w", offset = "off")
), embed_data = TRUE, anovas = list(
  list(models = c("reml_uncorr", "reml_corr"))
))

write_fixture("dyestuff2", lme4::Dyestuff2[c("Yield", "Batch")], list(
  fit("reml", "Yield ~ 1 + (1 | Batch)", TRUE),
  fit("ml", "Yield ~ 1 + (1 | Batch)", FALSE)
), embed_data = TRUE)

write_fixture("penicillin", lme4::Penicillin[c("diameter", "plate", "sample")], list(
  fit("reml", "diameter ~ 1 + (1 | plate) + (1 | sample)", TRUE),
  fit("ml", "diameter ~ 1 + (1 | plate) + (1 | sample)", FALSE)
), embed_data = TRUE)

write_fixture("pastes", lme4::Pastes[c("strength", "batch", "cask", "sample")], list(
  fit("reml", "strength ~ 1 + (1 | batch/cask)", TRUE),
  fit("ml", "strength ~ 1 + (1 | batch/cask)", FALSE)
), embed_data = TRUE)

write_fixture("dyestuff", lme4::Dyestuff[c("Yield", "Batch")], list(
  fit("reml", "Yield ~ 1 + (1 | Batch)", TRUE),
  fit("ml", "Yield ~ 1 + (1 | Batch)", FALSE)
), embed_data = TRUE)

# temperature as an unordered factor (lme4::cake has it ordered, i.e. polynomial contrasts), so that R uses
# treatment contrasts as patsy does.
cake <- data.frame(
  angle = lme4::cake$angle,
  recipe = lme4::cake$recipe,
  replicate = lme4::cake$replicate,
  temperature = factor(as.character(lme4::cake$temperature), levels = c("175", "185", "195", "205", "215", "225"))
)
write_fixture("cake", cake, list(
  fit("reml", "angle ~ recipe * temperature + (1 | recipe:replicate)", TRUE),
  fit("ml", "angle ~ recipe * temperature + (1 | recipe:replicate)", FALSE)
), embed_data = TRUE, anovas = list(
  list(models = c("ml_additive", "ml"),
       extra = list(fit("ml_additive", "angle ~ recipe + temperature + (1 | recipe:replicate)", FALSE)))
))

# nlme's Oats (split plot): the response is called `yield`, a Python keyword. Block as an unordered factor.
oats <- data.frame(
  yield = nlme::Oats$yield,
  Variety = factor(as.character(nlme::Oats$Variety)),
  nitro = nlme::Oats$nitro,
  Block = factor(as.character(nlme::Oats$Block))
)
write_fixture("oats", oats, list(
  fit("reml", "yield ~ Variety * nitro + (1 | Block) + (1 | Block:Variety)", TRUE),
  fit("ml", "yield ~ Variety * nitro + (1 | Block) + (1 | Block:Variety)", FALSE)
), embed_data = TRUE)

message(sprintf("done in %.1f s", proc.time()[["elapsed"]] - started))
