# lme4's side of glmer_scale.py: the same model on the CSV it wrote, lme4's defaults, one fit.
# Usage: Rscript glmer_scale.R binary|poisson DATA.csv
suppressMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[2], colClasses = c(s = "character", i = "character"))
t <- system.time(m <- if (args[1] == "binary") {
  glmer(y ~ x + (1 | s) + (1 | i), d, binomial)
} else {
  glmer(y ~ x + offset(logex) + (1 | s) + (1 | i), d, poisson)
})[["elapsed"]]
cat(sprintf("lme4 %s: %.1f s, logLik %.6f, %d evaluations\n", args[1], t, as.numeric(logLik(m)), m@optinfo$feval))
