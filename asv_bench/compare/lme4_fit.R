# Time lme4::lmer on one CSV and print one JSON line: seconds (median of `reps` fits), logLik, feval.
# Usage: Rscript lme4_fit.R data.csv "y ~ 1 + (1|group1) + (1|group2)" REML reps
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
data <- read.csv(args[1])
form <- as.formula(args[2])
reml <- as.logical(args[3])
reps <- as.integer(args[4])
times <- numeric(reps)
for (i in seq_len(reps)) {
  times[i] <- system.time(m <- lmer(form, data = data, REML = reml))[["elapsed"]]
}
cat(sprintf('{"seconds": %.6f, "logLik": %.10f, "feval": %d, "lme4": "%s", "blas": "%s"}\n',
            median(times), as.numeric(logLik(m)), m@optinfo$feval, packageVersion("lme4"),
            basename(extSoftVersion()[["BLAS"]])))
