# lme4 reference fits of random-slope (and a few variance-components) models on published data sets, for the optimizer's tests (the optimum
# on the boundary, correlated slopes up to 3 x 3, covariates far from zero).
#
# Usage: setarch -R Rscript random_slopes_fixtures.R [OUT_DIR]
#   Writes random_slopes.json (OUT_DIR defaults to this script's directory): one entry per data set with the
#   data under "data" and lme4's fits under "fits" ({name, formula, reml, logLik, theta, beta, isSingular, lme4_messages}).
#   Needs lme4, mlmRev, nlme and jsonlite (Debian: r-cran-lme4 r-cran-mlmrev r-cran-nlme). A few seconds.
# Numbers are written exactly (exact_json.R).

suppressPackageStartupMessages({
  library(lme4)
  library(mlmRev)
  library(nlme, include.only = character(0))
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
source(file.path(dirname(normalizePath(sub("^--file=", "", file_arg))), "exact_json.R"))   # num_str, exact_numbers, plain
out_dir <- if (length(args) >= 1) args[1] else script_dir()

# Subjects x items with a two-level condition (each subject sees each item once, its condition at random): random
# intercepts and condition effects for both, correlated; set.seed makes the data the same on every run.
subjects_items <- function(n_subjects, n_items) {
  set.seed(16)
  d <- expand.grid(subj = sprintf("s%02d", seq_len(n_subjects)), item = sprintf("i%02d", seq_len(n_items)),
                   stringsAsFactors = FALSE)
  d$cond <- sample(c("a", "b"), nrow(d), replace = TRUE)
  x <- ifelse(d$cond == "b", 0.5, -0.5)
  s <- matrix(rnorm(2 * n_subjects), ncol = 2) %*% matrix(c(0.3, 0.05, 0, 0.1), 2)
  it <- matrix(rnorm(2 * n_items), ncol = 2) %*% matrix(c(0.2, 0.02, 0, 0.08), 2)
  si <- match(d$subj, sprintf("s%02d", seq_len(n_subjects)))
  ii <- match(d$item, sprintf("i%02d", seq_len(n_items)))
  d$rt <- 6 + 0.1 * x + s[si, 1] + s[si, 2] * x + it[ii, 1] + it[ii, 2] * x + rnorm(nrow(d), sd = 0.4)
  d
}

fit_record <- function(name, formula, data, reml) {
  m <- lmer(as.formula(formula), data = data, REML = reml)
  list(name = name, formula = formula, reml = reml, logLik = as.numeric(logLik(m)),
       theta = unname(getME(m, "theta")), beta = as.list(fixef(m)), isSingular = isSingular(m),
       lme4_messages = I(as.character(unlist(m@optinfo$conv$lme4$messages))))
}

sets <- list(
  list(dataset = "mlmRev::Exam", data = plain(Exam[, c("normexam", "standLRT", "sex", "school")]),
       fits = list(c("exam_reml", "normexam ~ standLRT + sex + (standLRT + sex | school)", TRUE),
                   c("exam_ml", "normexam ~ standLRT + sex + (standLRT + sex | school)", FALSE))),
  list(dataset = "nlme::Oxboys", data = plain(nlme::Oxboys[, c("Subject", "age", "height")]),
       fits = list(c("oxboys_reml", "height ~ age + I(age^2) + (age + I(age^2) | Subject)", TRUE),
                   c("oxboys_ml", "height ~ age + I(age^2) + (age + I(age^2) | Subject)", FALSE))),
  list(dataset = "nlme::Orthodont", data = plain(nlme::Orthodont[, c("distance", "age", "Subject", "Sex")]),
       fits = list(c("orthodont_reml", "distance ~ age * Sex + (age | Subject)", TRUE),
                   c("orthodont_ml", "distance ~ age * Sex + (age | Subject)", FALSE),
                   # a numeric column read as a factor, as lme4 users write it
                   c("orthodont_factor_reml", "distance ~ factor(age) + Sex + (1 | Subject)", TRUE))),
  list(dataset = "mlmRev::Early", data = plain(Early[, c("cog", "age", "trt", "id")]),
       fits = list(c("early_reml", "cog ~ age * trt + (age | id)", TRUE),
                   c("early_ml", "cog ~ age * trt + (age | id)", FALSE),
                   # uncorrelated (one scalar term per column, of one grouping), issue 16's thirteenth session
                   c("early_uncorr_reml", "cog ~ age * trt + (age || id)", TRUE),
                   c("early_uncorr_ml", "cog ~ age * trt + (age || id)", FALSE))),
  list(dataset = "nlme::BodyWeight", data = plain(nlme::BodyWeight[, c("weight", "Time", "Rat", "Diet")]),
       fits = list(c("bodyweight_reml", "weight ~ Time * Diet + (Time | Rat)", TRUE),
                   c("bodyweight_ml", "weight ~ Time * Diet + (Time | Rat)", FALSE))),
  # More published data sets, fitted as users fit them (issue 16: the optimizer's checks on data nobody tuned to)
  list(dataset = "nlme::Machines", data = plain(nlme::Machines[, c("score", "Machine", "Worker")]),
       fits = list(c("machines_nested_reml", "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)", TRUE),
                   c("machines_slopes_ml", "score ~ Machine + (Machine | Worker)", FALSE))),
  list(dataset = "nlme::Pixel", data = plain(nlme::Pixel[, c("pixel", "day", "Dog", "Side")]),
       fits = list(c("pixel_reml", "pixel ~ day + I(day^2) + (day | Dog) + (1 | Side:Dog)", TRUE))),
  list(dataset = "nlme::Dialyzer", data = plain(nlme::Dialyzer[, c("rate", "pressure", "QB", "Subject")]),
       fits = list(c("dialyzer_ml", "rate ~ pressure + I(pressure^2) + QB + (pressure + I(pressure^2) | Subject)",
                     FALSE))),
  list(dataset = "mlmRev::Hsb82", data = plain(Hsb82[, c("mAch", "meanses", "sx", "cses", "school")]),
       fits = list(c("hsb82_reml", "mAch ~ meanses + sx * cses + (1 + cses | school)", TRUE))),
  list(dataset = "mlmRev::bdf", data = plain(bdf[, c("langPOST", "IQ.verb", "sex", "ses", "schoolNR")]),
       fits = list(c("bdf_ml", "langPOST ~ IQ.verb + sex + ses + (IQ.verb | schoolNR)", FALSE))),
  list(dataset = "mlmRev::egsingle", data = plain(egsingle[, c("math", "year", "size", "female", "childid",
                                                               "schoolid")]),
       fits = list(c("egsingle_reml", "math ~ year * size + female + (year | childid) + (year | schoolid)", TRUE),
                   c("egsingle_uncorr_ml", "math ~ year * size + female + (year || childid) + (year || schoolid)",
                     FALSE))),
  # Checked on data the optimizer was not built against (issue 16, eighth session): the growth curves of R's
  # datasets and mlmRev, and the model psycholinguists fit most, crossed subjects x items with slopes in both
  list(dataset = "datasets::ChickWeight", data = plain(transform(as.data.frame(ChickWeight),
                                                                 Chick = as.character(Chick), Diet = as.character(Diet))),
       fits = list(c("chickweight_reml", "weight ~ Time * Diet + (Time | Chick)", TRUE))),
  list(dataset = "datasets::Loblolly", data = plain(transform(as.data.frame(Loblolly), Seed = as.character(Seed))),
       fits = list(c("loblolly_ml", "height ~ age + I(age^2) + (age | Seed)", FALSE))),
  list(dataset = "mlmRev::Gcsemv", data = plain(na.omit(Gcsemv[, c("written", "gender", "school")])),
       fits = list(c("gcsemv_reml", "written ~ gender + (gender | school)", TRUE))),
  # Crossed variance components on an unbalanced design (pupils of 148 primary schools in 19 secondary schools),
  # held dense with the primary schools eliminated (issue 16, sixteenth session)
  list(dataset = "mlmRev::ScotsSec", data = plain(ScotsSec[, c("attain", "verbal", "sex", "primary", "second")]),
       fits = list(c("scotssec_reml", "attain ~ verbal + sex + (1 | primary) + (1 | second)", TRUE),
                   c("scotssec_ml", "attain ~ verbal + sex + (1 | primary) + (1 | second)", FALSE))),
  # R's constant pi in the formula, as nlme's Ovary model writes it (a harmonic in the time of the cycle), with
  # the sine's effect random beside the intercept, uncorrelated (Pinheiro & Bates' pdDiag)
  list(dataset = "nlme::Ovary", data = plain(nlme::Ovary[, c("follicles", "Time", "Mare")]),
       fits = list(c("ovary_reml", "follicles ~ sin(2*pi*Time) + cos(2*pi*Time) + (1 | Mare)", TRUE),
                   c("ovary_uncorr_ml", "follicles ~ sin(2*pi*Time) + cos(2*pi*Time) + (sin(2*pi*Time) || Mare)",
                     FALSE))),
  list(dataset = "simulated::subjects_items", data = subjects_items(30, 20),
       fits = list(c("maximal_reml", "rt ~ cond + (cond | subj) + (cond | item)", TRUE),
                   c("maximal_ml", "rt ~ cond + (cond | subj) + (cond | item)", FALSE)))
)

out <- lapply(sets, function(s) {
  fits <- lapply(s$fits, function(f) fit_record(f[1], f[2], s$data, as.logical(f[3])))
  list(dataset = s$dataset, data = s$data, fits = fits)
})
names(out) <- vapply(sets, function(s) sub(".*::", "", s$dataset), "")
out$versions <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                     mlmRev = as.character(packageVersion("mlmRev")), nlme = as.character(packageVersion("nlme")))
write_json(exact_numbers(out), file.path(out_dir, "random_slopes.json"), auto_unbox = TRUE, digits = NA,
           na = "null", json_verbatim = TRUE, dataframe = "columns")
