# Reference fixtures for Satterthwaite df on singular fits (lmerTest), from mlmRev's Early and Exam.
#
# Usage: setarch -R Rscript lmertest_singular_fixtures.R [OUT_DIR]
#   OUT_DIR defaults to the directory containing this script. Writes early.json and exam.json (fields: see
#   README.md). Needs lme4, lmerTest, mlmRev (Debian: r-cran-mlmrev) and jsonlite. A few seconds.
# Same conventions as lme4_fixtures.R: exact numbers, data embedded under "data", `setarch -R` for
# bit-identical reruns.

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(mlmRev)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
source(file.path(dirname(normalizePath(sub("^--file=", "", file_arg))), "exact_json.R"))   # num_str, exact_numbers
out_dir <- if (length(args) >= 1) args[1] else script_dir()

fit_record <- function(name, formula, data, reml) {
  formula <- as.formula(formula)
  m <- lme4::lmer(formula, data = data, REML = reml)
  # lmerTest's refit; its warnings (e.g. "Model failed to converge with 1 negative eigenvalue" on Early,
  # from the Hessian at the boundary) are recorded, not fatal.
  warns <- character(0)
  mt <- withCallingHandlers(lmerTest::lmer(formula, data = data, REML = reml),
                            warning = function(w) {
                              warns <<- c(warns, conditionMessage(w))
                              invokeRestart("muffleWarning")
                            })
  coefs <- summary(mt)$coefficients
  c(list(
    name = name,
    formula = paste(deparse(formula, width.cutoff = 500L), collapse = " "),
    reml = reml), estimate_fields(m, reml), list(
    isSingular = isSingular(m),
    satterthwaite_df = as.list(setNames(coefs[, "df"], rownames(coefs))),
    lmerTest = lapply(seq_len(nrow(coefs)), function(i) list(
      name = rownames(coefs)[i], estimate = coefs[i, "Estimate"], std_error = coefs[i, "Std. Error"],
      df = coefs[i, "df"], t = coefs[i, "t value"], p = coefs[i, "Pr(>|t|)"])),
    lmerTest_warnings = I(warns),
    lmerTest_vcov_varpar = unname(mt@vcov_varpar)
  ))
}

write_fixture <- function(dataset, data, fits) {
  out <- list(
    dataset = dataset,
    lme4_version = as.character(packageVersion("lme4")),
    lmerTest_version = as.character(packageVersion("lmerTest")),
    mlmRev_version = as.character(packageVersion("mlmRev")),
    R_version = R.version.string,
    data = lapply(data, function(col) if (is.factor(col)) as.character(col) else col),
    fits = lapply(fits, function(f) fit_record(f$name, f$formula, data, f$reml))
  )
  path <- file.path(out_dir, paste0(dataset, ".json"))
  write_json(exact_numbers(out), path, auto_unbox = TRUE, digits = NA, na = "null", json_verbatim = TRUE,
             pretty = TRUE)
  message("wrote ", path)
}

# 309 rows, 103 children: the random slope's correlation with the intercept is estimated at -1.
write_fixture("early", mlmRev::Early[c("cog", "age", "trt", "id")], list(
  list(name = "reml", formula = "cog ~ age * trt + (age | id)", reml = TRUE)
))

# 4,059 pupils in 65 schools, a 3 x 3 covariance whose sexM variance is estimated at zero.
write_fixture("exam", mlmRev::Exam[c("normexam", "standLRT", "sex", "type", "school")], list(
  list(name = "reml", formula = "normexam ~ standLRT + sex + type + (standLRT + sex | school)", reml = TRUE)
))
