# Time lme4::lmer on one CSV and print one JSON line: seconds (median of `reps` fits), logLik, feval.
# Usage: Rscript lme4_fit.R data.csv FORMULA REML reps [factor-columns weights-column offset-column]
#   factor-columns: comma-separated columns to read as factors (strings in the Python data frame).
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
data <- read.csv(args[1])
form <- as.formula(args[2])
reml <- as.logical(args[3])
reps <- as.integer(args[4])
arg <- function(i) if (length(args) >= i && nzchar(args[i])) args[i] else NULL
for (f in strsplit(if (is.null(arg(5))) "" else arg(5), ",")[[1]]) data[[f]] <- factor(as.character(data[[f]]))
# lmer evaluates weights/offset inside `data` first: keep them under names no data set uses.
data$.sparsemix_w <- if (is.null(arg(6))) 1 else data[[arg(6)]]
data$.sparsemix_off <- if (is.null(arg(7))) 0 else data[[arg(7)]]
# one untimed fit first, as compare.py's time_lmer does
m <- lmer(form, data = data, REML = reml, weights = .sparsemix_w, offset = .sparsemix_off)
times <- numeric(reps)
for (i in seq_len(reps)) {
  times[i] <- system.time(m <- lmer(form, data = data, REML = reml, weights = .sparsemix_w,
                                    offset = .sparsemix_off))[["elapsed"]]
}
cat(sprintf('{"seconds": %.6f, "logLik": %.10f, "feval": %d, "lme4": "%s", "blas": "%s"}\n',
            median(times), as.numeric(logLik(m)), m@optinfo$feval, packageVersion("lme4"),
            basename(extSoftVersion()[["BLAS"]])))
