# Usage: Rscript lme4_fit.R data.csv FORMULA [character-columns]; prints seconds, REML criterion, evaluations.
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
chars <- if (length(args) >= 3) strsplit(args[3], ",")[[1]] else character(0)
d <- read.csv(args[1], colClasses = setNames(rep("character", length(chars)), chars))
t <- system.time(m <- lmer(as.formula(args[2]), d, REML = TRUE))
cat(sprintf('{"seconds": %.3f, "REMLcrit": %.6f, "feval": %d}\n', t[["elapsed"]], REMLcrit(m), m@optinfo$feval))
