# Time lme4::lmer and print one JSON line per fit: seconds (median of `reps` fits), logLik, feval.
# Usage: Rscript lme4_fit.R data.csv FORMULA REML reps [factor-columns weights-column offset-column]
#    or: Rscript lme4_fit.R --serve   (one fit per line of stdin, the same seven fields tab-separated, each
#        answered as it comes: one R process for many models, which pays R's and lme4's start once, and whose
#        caller alternates its own fits with lme4's model by model)
#   factor-columns: comma-separated columns to read as factors (strings in the Python data frame).
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)

time_fit <- function(job) {
  data <- read.csv(job[1])
  form <- as.formula(job[2])
  reml <- as.logical(job[3])
  reps <- as.integer(job[4])
  field <- function(i) if (length(job) >= i && !is.na(job[i]) && nzchar(job[i])) job[i] else NULL
  for (f in strsplit(if (is.null(field(5))) "" else field(5), ",")[[1]]) data[[f]] <- factor(as.character(data[[f]]))
  # lmer evaluates weights/offset inside `data` first: keep them under names no data set uses.
  data$.sparsemix_w <- if (is.null(field(6))) 1 else data[[field(6)]]
  data$.sparsemix_off <- if (is.null(field(7))) 0 else data[[field(7)]]
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
}

if (args[1] == "--serve") {
  input <- file("stdin")
  open(input)
  while (length(line <- readLines(input, n = 1)) > 0) {
    time_fit(strsplit(line, "\t", fixed = TRUE)[[1]])
    flush(stdout())
  }
} else {
  time_fit(args)
}
