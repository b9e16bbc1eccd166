# Shared by the fixture scripts here: exact numbers in JSON, the folder a script runs from, and the fields every
# fit record has.
#
# jsonlite prints at most 15 significant digits (even with digits = NA or I(17)), so numbers are
# formatted here with the shortest "%.{15,16,17}g" form that reads back to the identical double and
# inserted verbatim. Length-1 vectors become scalars unless wrapped in I().
num_str <- function(v) vapply(v, function(x) {
  if (is.na(x)) return("null")
  for (d in 15:17) if (as.numeric(s <- sprintf("%.*g", d, x)) == x) break
  s
}, "")
json_array <- function(items) paste0("[", paste(items, collapse = ", "), "]")
exact_numbers <- function(x) {
  if (is.list(x)) return(structure(lapply(x, exact_numbers), names = names(x)))
  if (!is.numeric(x)) return(x)
  txt <- if (is.matrix(x)) json_array(apply(x, 1, function(row) json_array(num_str(row))))
         else if (length(x) == 1 && !inherits(x, "AsIs")) num_str(x)
         else json_array(num_str(x))
  structure(txt, class = "json")
}

# A data frame with its factors as text (how the fixtures embed data: pandas reads them as strings).
plain <- function(df) {
  df <- as.data.frame(df)
  for (col in names(df)) if (is.factor(df[[col]])) df[[col]] <- as.character(df[[col]])
  df
}

# The directory of the script Rscript is running (the default output folder).
script_dir <- function() {
  file_arg <- grep("^--file=", commandArgs(trailingOnly = FALSE), value = TRUE)
  dirname(normalizePath(sub("^--file=", "", file_arg)))
}

# VarCorr as rows {grp, var1, var2, vcov, sdcor}.
varcorr_rows <- function(m) {
  vc <- as.data.frame(VarCorr(m))
  lapply(seq_len(nrow(vc)), function(i) list(
    grp = vc$grp[i], var1 = vc$var1[i], var2 = vc$var2[i], vcov = vc$vcov[i], sdcor = vc$sdcor[i]
  ))
}

# The estimates of an lme4 fit, as every fixture records them (fields: README.md).
estimate_fields <- function(m, reml) {
  theta <- getME(m, "theta")
  list(
    logLik = as.numeric(logLik(m)),
    deviance_or_REMLcrit = if (reml) REMLcrit(m) else deviance(m),
    nobs = nobs(m),
    ngroups = as.list(ngrps(m)),
    beta = as.list(fixef(m)),
    se_beta = as.list(setNames(sqrt(diag(as.matrix(vcov(m)))), names(fixef(m)))),
    theta = I(unname(theta)),
    theta_names = I(names(theta)),
    sigma = sigma(m),
    varcorr = varcorr_rows(m)
  )
}
