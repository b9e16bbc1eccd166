# Reference fixtures from lme4 for sparsemix's tests.
#
# Usage: Rscript lme4_fixtures.R DATA_DIR [OUT_DIR]
#   DATA_DIR holds nested.csv and crossed.csv written by export_data.py.
#   OUT_DIR defaults to the directory containing this script.
# Writes one JSON file per data set. Apart from fit_seconds the output is reproducible up to lme4's own
# address-dependent rounding (~1e-8 in theta); run under `setarch -R` for bit-identical reruns.

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 1) stop("usage: Rscript lme4_fixtures.R DATA_DIR [OUT_DIR]")
data_dir <- args[1]
out_dir <- if (length(args) >= 2) args[2] else {
  file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
  dirname(normalizePath(sub("^--file=", "", file_arg)))
}

# jsonlite prints at most 15 significant digits (even with digits = NA or I(17)), so numbers are
# formatted here with the shortest "%.{15,16,17}g" form that reads back to the identical double and
# inserted verbatim. Length-1 vectors become scalars unless wrapped in I().
num_str <- function(v) vapply(v, function(x) {
  if (is.na(x)) return("null")
  for (d in 15:17) if (as.numeric(s <- sprintf("%.*g", d, x)) == x) break
  s
}, "")
json_array <- function(items) paste0("[", paste(items, collapse = ", "), "]")
exact_numbers <- function(x) {
  if (is.list(x)) return(structure(lapply(x, exact_numbers), names = names(x)))
  if (!is.numeric(x)) return(x)
  txt <- if (is.matrix(x)) json_array(apply(x, 1, function(row) json_array(num_str(row))))
         else if (length(x) == 1 && !inherits(x, "AsIs")) num_str(x)
         else json_array(num_str(x))
  structure(txt, class = "json")
}

fit_lmer <- function(formula, data, reml) lme4::lmer(formula, data = data, REML = reml)

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

varcorr_rows <- function(m) {
  vc <- as.data.frame(VarCorr(m))
  lapply(seq_len(nrow(vc)), function(i) list(
    grp = vc$grp[i], var1 = vc$var1[i], var2 = vc$var2[i], vcov = vc$vcov[i], sdcor = vc$sdcor[i]
  ))
}

satterthwaite_df <- function(formula, data, reml) {
  mt <- lmerTest::lmer(formula, data = data, REML = reml)
  coefs <- summary(mt)$coefficients
  as.list(setNames(coefs[, "df"], rownames(coefs)))
}

# One fitted model -> the list stored under "fits" in the JSON file.
fit_record <- function(name, formula, data, reml, with_ranef) {
  formula <- as.formula(formula)
  m <- fit_lmer(formula, data, reml)
  theta <- getME(m, "theta")
  rec <- list(
    name = name,
    formula = paste(deparse(formula, width.cutoff = 500L), collapse = " "),
    reml = reml,
    logLik = as.numeric(logLik(m)),
    deviance_or_REMLcrit = if (reml) REMLcrit(m) else deviance(m),
    nobs = nobs(m),
    ngroups = as.list(ngrps(m)),
    beta = as.list(fixef(m)),
    se_beta = as.list(setNames(sqrt(diag(as.matrix(vcov(m)))), names(fixef(m)))),
    theta = I(unname(theta)),
    theta_names = I(names(theta)),
    sigma = sigma(m),
    varcorr = varcorr_rows(m)
  )
  if (with_ranef) rec$ranef <- ranef_list(m)
  rec$isSingular <- isSingular(m)
  rec$optimizer_feval <- m@optinfo$feval
  rec$fit_seconds <- round(median(replicate(3, system.time(fit_lmer(formula, data, reml))[["elapsed"]])), 3)
  rec$satterthwaite_df <- satterthwaite_df(formula, data, reml)
  rec
}

# fits: list of fit() specs; data (and ranef) are embedded for lme4's own (small) data sets.
write_fixture <- function(dataset, data, fits, embed_data) {
  out <- list(
    dataset = dataset,
    lme4_version = as.character(packageVersion("lme4")),
    lmerTest_version = as.character(packageVersion("lmerTest")),
    R_version = R.version.string
  )
  if (embed_data) out$data <- lapply(data, function(col) if (is.factor(col)) as.character(col) else col)
  out$fits <- lapply(fits, function(f) fit_record(f$name, f$formula, data, f$reml, with_ranef = embed_data))
  path <- file.path(out_dir, paste0(dataset, ".json"))
  write_json(exact_numbers(out), path, auto_unbox = TRUE, digits = NA, na = "null", json_verbatim = TRUE,
             pretty = TRUE)
  message("wrote ", path)
}

fit <- function(name, formula, reml) list(name = name, formula = formula, reml = reml)

read_seed <- function(file) {
  d <- read.csv(file.path(data_dir, file), colClasses = c("numeric", "integer", "integer"))
  d$group1 <- factor(d$group1)
  d$group2 <- factor(d$group2)
  d
}

write_fixture("seed_nested", read_seed("nested.csv"), list(
  fit("reml", "y ~ 1 + (1 | group1) + (1 | group1:group2)", TRUE),
  fit("ml", "y ~ 1 + (1 | group1) + (1 | group1:group2)", FALSE)
), embed_data = FALSE)

write_fixture("seed_crossed", read_seed("crossed.csv"), list(
  fit("reml", "y ~ 1 + (1 | group1) + (1 | group2)", TRUE),
  fit("ml", "y ~ 1 + (1 | group1) + (1 | group2)", FALSE)
), embed_data = FALSE)

write_fixture("sleepstudy", lme4::sleepstudy[c("Reaction", "Days", "Subject")], list(
  fit("reml_corr", "Reaction ~ Days + (Days | Subject)", TRUE),
  fit("ml_corr", "Reaction ~ Days + (Days | Subject)", FALSE),
  fit("reml_uncorr", "Reaction ~ Days + (Days || Subject)", TRUE),
  fit("ml_uncorr", "Reaction ~ Days + (Days || Subject)", FALSE)
), embed_data = TRUE)

write_fixture("dyestuff2", lme4::Dyestuff2[c("Yield", "Batch")], list(
  fit("reml", "Yield ~ 1 + (1 | Batch)", TRUE)
), embed_data = TRUE)

write_fixture("penicillin", lme4::Penicillin[c("diameter", "plate", "sample")], list(
  fit("reml", "diameter ~ 1 + (1 | plate) + (1 | sample)", TRUE),
  fit("ml", "diameter ~ 1 + (1 | plate) + (1 | sample)", FALSE)
), embed_data = TRUE)
