# lme4 reference fits of models whose formulas call R's functions that lme4 users write: the splines package's ns()
# and bs(), relevel(), cut(), ifelse(), pmin()/pmax(), %in% with c(). Checks that sparsemix reads each as R does: the same
# columns (coefficients compared by position, names being patsy's), the same optimum, and the same predictions on
# new data (the splines' knots kept from the fitted data, extrapolated past its range as R does).
#
# Usage: setarch -R Rscript r_functions_fixtures.R [OUT_DIR]
#   Writes r_functions.json (OUT_DIR defaults to this script's directory): one entry per data set with the data
#   under "data" and lme4's fits under "fits" ({name, formula, reml, logLik, beta, theta, newdata, predicted}).
#   Needs lme4, nlme and jsonlite (Debian: r-cran-lme4 r-cran-nlme r-cran-jsonlite). A few seconds.
# Numbers are written exactly (exact_json.R).

suppressPackageStartupMessages({
  library(lme4)
  library(splines)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
source(file.path(dirname(normalizePath(sub("^--file=", "", file_arg))), "exact_json.R"))   # num_str, exact_numbers, plain
out_dir <- if (length(args) >= 1) args[1] else script_dir()

# newdata: rows for predict(re.form = NA), the population-level predictions (R's columns as they are: text stays text)
fit_record <- function(name, formula, data, reml, newdata = NULL) {
  m <- lmer(as.formula(formula), data = data, REML = reml)
  out <- list(name = name, formula = formula, reml = reml, logLik = as.numeric(logLik(m)),
              beta = I(unname(fixef(m))), beta_names = I(names(fixef(m))), theta = I(unname(getME(m, "theta"))))
  if (!is.null(newdata)) {
    out$newdata <- newdata
    out$predicted <- I(unname(predict(m, newdata = newdata, re.form = NA)))
  }
  out
}

sleep <- plain(sleepstudy)
chick <- plain(transform(as.data.frame(ChickWeight), Chick = as.character(Chick), Diet = as.character(Diet)))
oats <- plain(data.frame(yield = nlme::Oats$yield, Variety = as.character(nlme::Oats$Variety),
                         nitro = nlme::Oats$nitro, Block = as.character(nlme::Oats$Block)))
orth <- plain(nlme::Orthodont[, c("distance", "age", "Subject", "Sex")])

sets <- list(
  list(dataset = "sleepstudy", data = sleep, fits = list(
    # natural cubic splines (knots at the quantiles of Days), with new days inside and past the fitted range
    list("ns_reml", "Reaction ~ ns(Days, 3) + (Days | Subject)", TRUE, data.frame(Days = c(-2, 0, 2.5, 4.5, 9, 12))),
    list("ns_knots_ml", "Reaction ~ ns(Days, knots = c(3, 6)) + (1 | Subject)", FALSE,
         data.frame(Days = c(0, 1.5, 7.25, 9))),
    list("bs_reml", "Reaction ~ bs(Days, df = 4) + (1 | Subject)", TRUE, data.frame(Days = c(0, 2.5, 4.5, 9))),
    list("bs_degree_ml", "Reaction ~ bs(Days, knots = c(4), degree = 2) + (Days | Subject)", FALSE,
         data.frame(Days = c(0, 3.5, 8))),
    # a broken stick (the slope changes after day 4): ifelse and pmax write the same column
    list("ifelse_reml", "Reaction ~ Days + ifelse(Days > 4, Days - 4, 0) + (Days | Subject)", TRUE,
         data.frame(Days = c(1, 5, 8))),
    list("pmax_reml", "Reaction ~ Days + pmax(Days - 4, 0) + (Days | Subject)", TRUE, data.frame(Days = c(1, 5, 8))),
    list("pmin_ml", "Reaction ~ pmin(Days, 6) + (1 | Subject)", FALSE, NULL),
    list("in_reml", "Reaction ~ Days + I(Days %in% c(0, 1)) + (1 | Subject)", TRUE, NULL),
    # intervals as a factor: a number of them (R's widened range, kept for new data), bounds closed on either side
    list("cut_count_reml", "Reaction ~ cut(Days, 3) + (Days | Subject)", TRUE, data.frame(Days = c(0, 3, 4, 9))),
    list("cut_breaks_ml", "Reaction ~ cut(Days, c(0, 2, 5, 9), include.lowest = TRUE) + (1 | Subject)", FALSE,
         data.frame(Days = c(0, 2, 3, 9))),
    list("cut_left_reml", "Reaction ~ Days + cut(Days, c(-Inf, 3, Inf), right = FALSE) + (1 | Subject)", TRUE,
         data.frame(Days = c(2, 3, 20))))),
  list(dataset = "ChickWeight", data = chick, fits = list(
    list("ns_diet_reml", "weight ~ ns(Time, 4) * Diet + (1 | Chick)", TRUE,
         data.frame(Time = c(0, 5, 11, 21, 24), Diet = c("1", "2", "3", "4", "2"))),
    list("bs_ml", "weight ~ bs(Time, df = 5) + Diet + (Time | Chick)", FALSE, NULL))),
  list(dataset = "nlme::Oats", data = oats, fits = list(
    # the baseline moved to Victory (R's relevel of the factor; a character column read as one)
    list("relevel_reml", "yield ~ relevel(factor(Variety), ref = \"Victory\") + nitro + (1 | Block)", TRUE,
         data.frame(Variety = c("Victory", "Marvellous"), nitro = c(0.2, 0.4))),
    list("relevel_inter_ml", "yield ~ relevel(factor(Variety), \"Marvellous\") * nitro + (1 | Block)", FALSE, NULL))),
  list(dataset = "nlme::Orthodont", data = orth, fits = list(
    # factor(age)'s second level ("10") as the baseline, given by its position as R allows
    list("relevel_position_reml", "distance ~ relevel(factor(age), 2) + Sex + (1 | Subject)", TRUE, NULL),
    list("in_sex_reml", "distance ~ age + I(Sex %in% c(\"Female\")) + (age | Subject)", TRUE, NULL)))
)

out <- lapply(sets, function(s) {
  fits <- lapply(s$fits, function(f) fit_record(f[[1]], f[[2]], s$data, f[[3]], f[[4]]))
  list(dataset = s$dataset, data = s$data, fits = fits)
})
names(out) <- vapply(sets, function(s) sub(".*::", "", s$dataset), "")
out$versions <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")))
write_json(exact_numbers(out), file.path(out_dir, "r_functions.json"), auto_unbox = TRUE, digits = NA,
           na = "null", json_verbatim = TRUE, dataframe = "columns")
