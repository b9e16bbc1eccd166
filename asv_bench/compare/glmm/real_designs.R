# lme4's side of real_designs.py: glmer on published data sets that no part of sparsemix was tuned to, each timed as
# the median of `reps` fits (after one untimed fit), and each data set written as CSV for the Python side (factors as
# text, ordered factors unordered so that both sides use treatment contrasts, binary factors as 0/1).
# Usage: Rscript real_designs.R OUT_DIR [REPS]
suppressMessages({library(lme4); library(mlmRev); library(MASS); library(jsonlite)})
args <- commandArgs(trailingOnly = TRUE)
out <- args[1]
reps <- if (length(args) > 1) as.integer(args[2]) else 5L
dir.create(out, showWarnings = FALSE, recursive = TRUE)
plain <- function(d) {
  for (v in names(d)) if (is.factor(d[[v]])) d[[v]] <- factor(as.character(d[[v]]))
  d
}
binary <- function(f) as.integer(f != levels(f)[1])
ara <- Arabidopsis
ara$reg <- factor(ara$reg); ara$popu <- factor(ara$popu); ara$gen <- factor(ara$gen)
gi <- guImmun; gi$immun <- binary(gi$immun)
gp <- guPrenat; gp$prenat <- binary(gp$prenat)
ba <- bacteria; ba$y <- binary(ba$y); ba$late <- as.integer(ba$week > 2)
co <- Contraception; co$use <- binary(co$use)
va <- VerbAgg; va$y <- binary(va$r2)
models <- list(
  cbpp = list(cbpp, "cbind(incidence, size - incidence) ~ period + (1 | herd)", binomial),
  grouseticks = list(grouseticks, "TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)", poisson),
  contraception = list(co, "use ~ age + I(age^2) + urban + livch + (1 | district)", binomial),
  mmmec = list(Mmmec, "deaths ~ uvb + offset(log(expected)) + (1 | region)", poisson),
  bacteria = list(ba, "y ~ trt + late + (1 | ID)", binomial),
  epil = list(epil, "y ~ trt + lbase + lage + V4 + (1 | subject)", poisson),
  esoph = list(esoph, "cbind(ncases, ncontrols) ~ tobgp + alcgp + (1 | agegp)", binomial),
  warpbreaks = list(warpbreaks, "breaks ~ tension + (1 | wool)", poisson),
  arabidopsis = list(ara, "total.fruits ~ nutrient + amd + status + (1 | reg) + (1 | popu) + (1 | gen)", poisson),
  guimmun = list(gi, "immun ~ kid2p + mom25p + ord + ethn + momEd + husEd + momWork + rural + pcInd81 + (1 | mom) + (1 | comm)", binomial),
  verbagg = list(va, "y ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", binomial)
)
results <- list()
for (name in names(models)) {
  spec <- models[[name]]
  d <- plain(spec[[1]])
  write.csv(d, file.path(out, paste0(name, ".csv")), row.names = FALSE)
  f <- as.formula(spec[[2]])
  fit <- function() suppressWarnings(suppressMessages(glmer(f, d, spec[[3]])))
  m <- fit()
  times <- sapply(seq_len(reps), function(i) system.time(m <- fit())[["elapsed"]])
  results[[name]] <- list(formula = spec[[2]], family = spec[[3]]()$family, seconds = median(times),
                          logLik = as.numeric(logLik(m)), feval = m@optinfo$feval, rows = nrow(d),
                          factors = I(names(d)[sapply(d, is.factor)]))
}
cat(toJSON(results, auto_unbox = TRUE, digits = NA), "\n")
