# lme4's side of many_fits.py: bootMer (one process, as its default), refit and lmer in a loop on sleepstudy.
suppressMessages(library(lme4))
fm1 <- lmer(Reaction ~ Days + (Days | Subject), sleepstudy)
f <- function(m) c(getME(m, "theta"), sigma(m), fixef(m))
quiet <- function(expr) suppressWarnings(suppressMessages(expr))
t <- system.time(quiet(bootMer(fm1, f, nsim = 500, seed = 1)))[["elapsed"]]
cat(sprintf("bootMer: %.2f ms/replicate (10,000: %.0f s)\n", 1000 * t / 500, 10000 * t / 500))
ys <- simulate(fm1, nsim = 200, seed = 1)
t <- system.time(quiet(for (i in 1:200) refit(fm1, ys[[i]])))[["elapsed"]]
cat(sprintf("refit: %.2f ms a fit\n", 1000 * t / 200))
t <- system.time(quiet(for (i in 1:100) lmer(Reaction ~ Days + (Days | Subject), transform(sleepstudy, Reaction = ys[[i]]))))[["elapsed"]]
cat(sprintf("lmer in a loop: %.2f ms a fit\n", 1000 * t / 100))
