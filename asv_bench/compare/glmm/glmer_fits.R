# lme4's side of glmer_fits.py: glmer on lme4's VerbAgg (crossed, Laplace) and cbpp, each timed as the median of
# five fits, with lme4's defaults (its PIRLS stops early: tolPwrss 1e-7) and with the tight PIRLS the fixtures use.
suppressMessages(library(lme4))
va <- VerbAgg; va$y <- as.integer(va$r2 == "Y")
time_fit <- function(fit) {  # fit: a function of no arguments returning the model
  times <- numeric(5)
  for (i in 1:5) times[i] <- system.time(m <- fit())[["elapsed"]]
  list(seconds = median(times), logLik = as.numeric(logLik(m)), feval = m@optinfo$feval)
}
tight <- glmerControl(tolPwrss = 1e-12)
out <- list(
  verbagg = time_fit(function() glmer(y ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), va, binomial)),
  verbagg_tight = time_fit(function() glmer(y ~ Anger + Gender + btype + situ + (1 | id) + (1 | item), va,
                                            binomial, control = tight)),
  cbpp = time_fit(function() glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial))
)
cat(jsonlite::toJSON(out, auto_unbox = TRUE, digits = NA), "\n")
